//! Conversion: tensors from a loaded checkpoint to a safetensors file.
//!
//! Each tensor becomes a [`View`] over the storage bytes. Row-major,
//! little-endian tensors without conj/neg bits are written straight from the
//! input: large ones file to file (`copy_file_range` on Linux, through
//! `std::io::copy`), small ones from the mapping through one write buffer.
//! The others are gathered, byte-swapped or sign-fixed lazily, one tensor at
//! a time, while the writer streams. The output is synced once, at the end.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use tensafe::{Dtype, Metadata, Prepared, StagedWrites, View, WriteOptions};

use crate::container::{self, Checkpoint, Format, LoadOptions};
use crate::error::{Error, Result};
use crate::extract::{self, ExtractOptions};
use crate::names::TorchDtype;
use crate::value::{Object, ObjId, Tensor};

/// Conversion options.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Loading (limits, opaque classes).
    pub load: LoadOptions,
    /// Finding the tensors.
    pub extract: ExtractOptions,
    /// Write one copy of exact aliases, recording `removed → kept` in the
    /// metadata like the reference's `save_model`.
    pub dedupe: bool,
    /// Keep non-tensor values as JSON strings in `__metadata__`.
    pub keep_non_tensors: bool,
    /// Map BOOL bytes other than 0/1 to 1 instead of refusing.
    pub lenient_bool: bool,
    /// Write `"format": "pt"` in the metadata (what transformers expects).
    pub format_metadata: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            load: LoadOptions::default(),
            extract: ExtractOptions::default(),
            dedupe: false,
            keep_non_tensors: false,
            lenient_bool: false,
            format_metadata: true,
        }
    }
}

/// One converted tensor.
#[derive(Debug, Clone, Serialize)]
pub struct TensorReport {
    /// Name in the output.
    pub name: String,
    /// safetensors dtype.
    pub dtype: &'static str,
    /// Shape in the output.
    pub shape: Vec<usize>,
    /// Bytes in the output.
    pub bytes: usize,
    /// Storage key it was read from.
    pub storage: String,
    /// Whether it had to be copied (strided view, byte swap, conj/neg bit).
    pub copied: bool,
}

/// What a conversion did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConvertReport {
    /// `zip` or `legacy`.
    pub format: &'static str,
    /// Path of the selected state dict (empty: the top level).
    pub root: String,
    /// Tensors written, in input order.
    pub tensors: Vec<TensorReport>,
    /// Names sharing one storage (views or aliases), for information.
    pub shared_storages: Vec<Vec<String>>,
    /// `(removed, kept)` pairs when de-duplicating.
    pub deduplicated: Vec<(String, String)>,
    /// Non-tensor values: path and JSON text.
    pub non_tensors: Vec<(String, String)>,
    /// Things left out and why.
    pub skipped: Vec<(String, String)>,
    /// Warnings.
    pub warnings: Vec<String>,
    /// Bytes of tensor data written.
    pub data_bytes: u64,
    /// Of `data_bytes`, how many were copied from the input file to the
    /// output file (`io::copy`: `copy_file_range` where the kernel allows;
    /// large tensors stored as they are, converting from a file).
    pub file_copied_bytes: u64,
}

/// How one tensor's bytes are produced from the input: borrowed when they
/// are already row-major little-endian, else gathered on demand. Implements
/// [`View`], so it can be handed to the writer directly.
pub struct TensorPlan<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    len: usize,
    /// The storage bytes (the whole record, or the legacy view of it).
    storage: &'a [u8],
    itemsize: usize,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
    contiguous: bool,
    swap_unit: Option<usize>,
    conj: bool,
    neg: Neg,
    normalize_bool: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Neg {
    No,
    SignBit,
    TwosComplement,
}

impl<'a> TensorPlan<'a> {
    /// Whether the bytes are written straight from the input.
    pub fn borrowable(&self) -> bool {
        self.contiguous && self.swap_unit.is_none() && !self.conj && self.neg == Neg::No && !self.normalize_bool
    }

    /// The output bytes as they lie in the input, when no copy is needed.
    pub fn borrowed(&self) -> Option<&'a [u8]> {
        if !self.borrowable() {
            return None;
        }
        if self.len == 0 {
            // torch leaves an empty tensor's offset unchecked: it may lie past
            // the end of its storage (`x.view(5, 2)[5:, 1:]` of 10 elements).
            return Some(&[]);
        }
        let start = self.offset * self.itemsize;
        Some(&self.storage[start..start + self.len])
    }

    fn gather(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        if self.len == 0 {
            return out;
        }
        if self.contiguous {
            let start = self.offset * self.itemsize;
            out.extend_from_slice(&self.storage[start..start + self.len]);
        } else {
            // The innermost dimensions that are row-major form one run.
            let ndim = self.size.len();
            let mut k = ndim;
            let mut run = 1usize;
            while k > 0 && (self.size[k - 1] == 1 || self.stride[k - 1] == run) {
                run *= self.size[k - 1];
                k -= 1;
            }
            let run_bytes = run * self.itemsize;
            let mut index = vec![0usize; k];
            loop {
                let at = self.offset + index.iter().zip(&self.stride).map(|(i, s)| i * s).sum::<usize>();
                let start = at * self.itemsize;
                out.extend_from_slice(&self.storage[start..start + run_bytes]);
                // Odometer over the outer dimensions.
                let mut d = k;
                loop {
                    if d == 0 {
                        return self.fix(out);
                    }
                    d -= 1;
                    index[d] += 1;
                    if index[d] < self.size[d] {
                        break;
                    }
                    index[d] = 0;
                }
            }
        }
        self.fix(out)
    }

    /// Byte order, conj and neg bits, BOOL normalisation, on output bytes.
    fn fix(&self, mut out: Vec<u8>) -> Vec<u8> {
        if let Some(unit) = self.swap_unit {
            out.chunks_exact_mut(unit).for_each(<[u8]>::reverse);
        }
        let item = self.itemsize;
        if self.conj {
            // complex64: flip the sign of the imaginary part (little-endian f32).
            out.chunks_exact_mut(item).for_each(|c| c[item - 1] ^= 0x80);
        }
        match self.neg {
            Neg::No => {}
            Neg::SignBit => {
                let unit = self.swap_unit_len();
                out.chunks_exact_mut(unit).for_each(|c| c[unit - 1] ^= 0x80);
            }
            Neg::TwosComplement => out.chunks_exact_mut(item).for_each(|c| {
                // Little-endian two's complement negation: invert, add one.
                let mut carry = true;
                for b in c.iter_mut() {
                    let (v, o) = (!*b).overflowing_add(carry as u8);
                    *b = v;
                    carry = o;
                }
            }),
        }
        if self.normalize_bool {
            out.iter_mut().for_each(|b| *b = (*b != 0) as u8);
        }
        out
    }

    fn swap_unit_len(&self) -> usize {
        if self.dtype == Dtype::C64 { 4 } else { self.itemsize }
    }
}

impl View for TensorPlan<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self.borrowed() {
            Some(bytes) => Cow::Borrowed(bytes),
            None => Cow::Owned(self.gather()),
        }
    }
    fn data_len(&self) -> usize {
        self.len
    }
}

fn to_usize(v: u64, name: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::Tensor { name: name.to_owned(), reason: format!("{v} does not fit in memory addresses") })
}

/// Builds the copy plan of one tensor, checking it against the real bytes.
fn plan<'a>(ck: &'a Checkpoint<'_>, name: &str, t: &Tensor, lenient_bool: bool) -> Result<TensorPlan<'a>> {
    let err = |reason: String| Error::Tensor { name: name.to_owned(), reason };
    let dtype = t.dtype.safetensors().ok_or_else(|| err(format!("torch dtype {} has no safetensors equivalent", t.dtype.name)))?;
    let Object::Storage(st) = ck.heap.get(t.storage) else { unreachable!("tensors point at storages") };
    let record = ck.records.get(&st.key).ok_or_else(|| err(format!("storage `{}` has no data record", st.key)))?;
    let es = st.storage_type.element_size() as usize;
    let storage: &[u8] = match &st.view {
        None => record,
        Some((view_key, off, len)) => record
            .get(*off as usize * es..(*off + *len) as usize * es)
            .ok_or_else(|| err(format!("storage view `{view_key}` lies outside storage `{}`", st.key)))?,
    };
    let itemsize = t.dtype.itemsize as usize;
    let size: Vec<usize> = t.size.iter().map(|&s| to_usize(s, name)).collect::<Result<_>>()?;
    let stride: Vec<usize> = t.stride.iter().map(|&s| to_usize(s, name)).collect::<Result<_>>()?;
    let offset = to_usize(t.offset, name)?;
    let numel = size.iter().try_fold(1usize, |a, &s| a.checked_mul(s)).ok_or_else(|| err("element count overflows".into()))?;
    let len = numel.checked_mul(itemsize).ok_or_else(|| err("byte size overflows".into()))?;
    // Extent against the actual bytes (the VM checked it against the declaration).
    let mut extent_end = 0usize;
    if numel > 0 {
        let last = size.iter().zip(&stride).try_fold(offset, |acc, (s, st)| (s - 1).checked_mul(*st).and_then(|x| x.checked_add(acc)));
        let end = last.and_then(|l| l.checked_add(1)).and_then(|e| e.checked_mul(itemsize));
        match end {
            Some(end) if end <= storage.len() => extent_end = end,
            _ => return Err(err(format!("extent runs past the {} bytes of storage `{}`", storage.len(), st.key))),
        }
    }
    let mut shape = size.clone();
    if dtype == Dtype::F4 {
        // float4_e2m1fn_x2 packs two values per byte: safetensors counts values.
        let last = shape.last_mut().ok_or_else(|| err("a 0-d float4_e2m1fn_x2 tensor cannot be written as F4".into()))?;
        *last = last.checked_mul(2).ok_or_else(|| err("shape overflows".into()))?;
    }
    let mut expected = 1usize;
    let mut contiguous = true;
    for (s, st) in size.iter().zip(&stride).rev() {
        if *s != 1 {
            if *st != expected {
                contiguous = false;
            }
            expected *= s;
        }
    }
    let neg = if !t.neg {
        Neg::No
    } else if t.dtype.neg_is_sign_flip() {
        Neg::SignBit
    } else if t.dtype.neg_is_twos_complement() {
        Neg::TwosComplement
    } else {
        return Err(err(format!("the negative bit cannot be applied exactly to {}", t.dtype.name)));
    };
    if t.conj && dtype != Dtype::C64 {
        return Err(err(format!("conjugate bit on a non-complex {} tensor", t.dtype.name)));
    }
    let mut normalize_bool = false;
    if dtype == Dtype::Bool && numel > 0 {
        let window = &storage[offset..extent_end];
        if let Some(i) = window.iter().position(|&b| b > 1) {
            if lenient_bool {
                normalize_bool = true;
            } else {
                return Err(err(format!(
                    "BOOL storage `{}` holds the byte {} at element {}; booleans must be 0 or 1 (pass --lenient-bool to map it to 1)",
                    st.key,
                    window[i],
                    offset + i
                )));
            }
        }
    }
    let swap_unit = (ck.big_endian && t.dtype.swap_unit() > 1).then(|| t.dtype.swap_unit());
    Ok(TensorPlan { dtype, shape, len, storage, itemsize, offset, size, stride, contiguous, swap_unit, conj: t.conj, neg, normalize_bool })
}

/// The alias identity of a tensor: same bytes, same geometry, same bits.
#[derive(PartialEq, Eq, Hash)]
struct AliasKey {
    storage: String,
    view: Option<(u64, u64)>,
    dtype: &'static str,
    offset: u64,
    size: Vec<u64>,
    stride: Vec<u64>,
    conj: bool,
    neg: bool,
}

fn alias_key(ck: &Checkpoint<'_>, t: &Tensor) -> AliasKey {
    let Object::Storage(st) = ck.heap.get(t.storage) else { unreachable!("tensors point at storages") };
    AliasKey {
        storage: st.key.to_string(),
        view: st.view.as_ref().map(|v| (v.1, v.2)),
        dtype: t.dtype.name,
        offset: t.offset,
        size: t.size.clone(),
        stride: t.stride.clone(),
        conj: t.conj,
        neg: t.neg,
    }
}

/// A checked conversion, ready to write.
pub struct Planned<'a> {
    /// What will be written and what was left out.
    pub report: ConvertReport,
    /// The `__metadata__` to write.
    pub metadata: Metadata,
    /// Output tensors, in input order.
    pub tensors: Vec<(String, TensorPlan<'a>)>,
}

/// Two entries for one metadata key: kept non-tensor values, the names of
/// removed duplicates (`removed_copy`), and the `format` entry every
/// converted file carries.
fn metadata_clash(key: &str, removed_copy: bool, options: &ConvertOptions) -> Error {
    if key == "format" && options.format_metadata {
        let (what, flag) = if removed_copy {
            ("a copy removed by --dedupe is named `format`, so it cannot be recorded in the metadata", "--dedupe")
        } else {
            ("the checkpoint's top-level `format` entry cannot be kept as metadata", "--keep-metadata")
        };
        return Error::Structure(format!("{what}: every converted file carries `format: pt` there (convert without {flag})"));
    }
    Error::Structure(format!("metadata key `{key}` is used twice"))
}

/// Plans a conversion: selects and names the tensors, checks each against
/// its storage bytes and the output budget, and builds the metadata.
pub fn plan_checkpoint<'a>(ck: &'a Checkpoint<'_>, options: &ConvertOptions) -> Result<Planned<'a>> {
    let limits = &options.load.limits;
    let ex = extract::extract(&ck.heap, &ck.root, &options.extract, limits)?;
    let mut report = ConvertReport {
        format: match ck.format {
            Format::Zip => "zip",
            Format::Legacy => "legacy",
        },
        root: ex.root.clone(),
        skipped: ex.skipped.clone(),
        warnings: ck.warnings.clone(),
        ..Default::default()
    };
    let mut metadata = Metadata::new();
    if options.format_metadata {
        metadata.insert("format".into(), "pt".into());
    }
    // The JSON of all non-tensor values together, within one budget (a
    // header holds at most 100 MB), the rest shown as "…".
    let mut budget = NON_TENSOR_JSON_BYTES;
    for (path, value) in &ex.non_tensors {
        let text = extract::to_json(&ck.heap, value, &mut budget).to_string();
        if options.keep_non_tensors && metadata.insert(path.clone(), text.clone()).is_some() {
            return Err(metadata_clash(path, false, options));
        }
        report.non_tensors.push((path.clone(), text));
    }

    // Aliases: same storage and geometry. Storage sharing, for the report.
    let tensor = |id: ObjId| match ck.heap.get(id) {
        Object::Tensor(t) => t,
        _ => unreachable!("extract emits tensors only"),
    };
    let mut by_storage: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut alias_groups: HashMap<_, Vec<usize>> = HashMap::new();
    for (i, (name, id)) in ex.tensors.iter().enumerate() {
        let t = tensor(*id);
        let Object::Storage(st) = ck.heap.get(t.storage) else { unreachable!() };
        by_storage.entry(st.key.to_string()).or_default().push(name.clone());
        alias_groups.entry(alias_key(ck, t)).or_default().push(i);
    }
    report.shared_storages = by_storage.into_values().filter(|names| names.len() > 1).collect();
    let mut dropped = vec![false; ex.tensors.len()];
    if options.dedupe {
        let mut groups: Vec<&Vec<usize>> = alias_groups.values().filter(|g| g.len() > 1).collect();
        groups.sort();
        for group in groups {
            let keep = *group.iter().min_by_key(|&&i| &ex.tensors[i].0).expect("non-empty group");
            for &i in group {
                if i != keep {
                    dropped[i] = true;
                    let (removed, kept) = (ex.tensors[i].0.clone(), ex.tensors[keep].0.clone());
                    if metadata.insert(removed.clone(), kept.clone()).is_some() {
                        return Err(metadata_clash(&removed, true, options));
                    }
                    report.deduplicated.push((removed, kept));
                }
            }
        }
        report.deduplicated.sort();
    }

    // Plans, with the output budget.
    let unique: u64 = ck.records.values().map(|r| r.len() as u64).sum();
    let budget = limits.output_budget(unique);
    let mut total = 0u64;
    let mut plans = Vec::with_capacity(ex.tensors.len());
    for (i, (name, id)) in ex.tensors.iter().enumerate() {
        if dropped[i] {
            continue;
        }
        let p = plan(ck, name, tensor(*id), options.lenient_bool)?;
        total = total.saturating_add(p.len as u64);
        if total > budget {
            return Err(Error::Limit(format!(
                "the tensors would write more than {budget} bytes from {unique} bytes of storage (stride-0 or view bomb; ratio {:.1}×)",
                total as f64 / unique.max(1) as f64
            )));
        }
        let Object::Storage(st) = ck.heap.get(tensor(*id).storage) else { unreachable!() };
        report.tensors.push(TensorReport {
            name: name.clone(),
            dtype: p.dtype.code(),
            shape: p.shape.clone(),
            bytes: p.len,
            storage: st.key.to_string(),
            copied: !p.borrowable(),
        });
        plans.push((name.clone(), p));
    }
    report.data_bytes = total;
    Ok(Planned { report, metadata, tensors: plans })
}

/// Converts a loaded checkpoint, writing `out` atomically.
pub fn convert_checkpoint(ck: &Checkpoint<'_>, out: &Path, options: &ConvertOptions) -> Result<ConvertReport> {
    let planned = plan_checkpoint(ck, options)?;
    let mut staged = StagedWrites::default();
    write_planned(&planned, None, out, &mut staged)?;
    staged.commit()?;
    Ok(planned.report)
}

/// Borrowed tensors at least this large are copied file to file; smaller
/// ones go through the write buffer (a system call each would cost more).
const FILE_COPY_MIN: usize = 256 << 10;
/// The write buffer for the header, small tensors and gathered ones.
const WRITE_BUFFER: usize = 1 << 20;

/// The budget of [`extract::to_json`] all of a checkpoint's non-tensor
/// values share (in the report, and in the metadata with
/// `keep_non_tensors`): about the bytes their JSON takes in memory.
pub const NON_TENSOR_JSON_BYTES: usize = 64 << 20;

/// Writes a planned conversion to replace `out` when `staged` is committed
/// (a temporary file, one fsync; the rename at the commit). With `source`,
/// the mapped file the checkpoint was loaded from, large borrowed tensors
/// are copied from that file by the kernel; returns how many bytes were.
fn write_planned(planned: &Planned<'_>, source: Option<&Mapped>, out: &Path, staged: &mut StagedWrites) -> Result<u64> {
    let tensors = planned.tensors.iter().map(|(n, p)| (n.as_str(), p));
    let prepared = tensafe::prepare(tensors, Some(&planned.metadata), &WriteOptions::default()).map_err(|e| e.in_file(out))?;
    let mut file_copied = 0;
    staged.write_file(out, |file| {
        file_copied = write_prepared(&prepared, source, file)?;
        Ok(())
    })
    .map_err(|e| e.in_file(out))?;
    Ok(file_copied)
}

/// Header, then each tensor in file order. A borrowed tensor's bytes are
/// exactly the input range that loading validated (sizes against the
/// declarations, bounds, CRC over the mapping, which shares the file's page
/// cache), so copying that range of the file writes the same bytes.
fn write_prepared(prepared: &Prepared<&str, &TensorPlan<'_>>, source: Option<&Mapped>, file: &mut File) -> io::Result<u64> {
    let mut writeback = Writeback::default();
    let mut file_copied = 0u64;
    let mut out = BufWriter::with_capacity(WRITE_BUFFER, &mut *file);
    out.write_all(&prepared.header)?;
    let mut written = prepared.header.len() as u64;
    for (name, plan) in &prepared.tensors {
        let in_file = plan.borrowed().filter(|b| b.len() >= FILE_COPY_MIN).and_then(|b| source?.locate(b));
        if let Some((mut input, at)) = in_file {
            out.flush()?;
            input.seek(SeekFrom::Start(at))?;
            // In steps, so that the disk writes of a huge tensor start early too.
            let mut left = plan.len as u64;
            while left > 0 {
                let step = left.min(Writeback::STEP);
                let copied = io::copy(&mut input.take(step), out.get_mut())?;
                if copied != step {
                    let done = plan.len as u64 - left + copied;
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("tensor `{name}`: the input ended after {done} of {} bytes (was it truncated?)", plan.len),
                    ));
                }
                left -= step;
                written += step;
                writeback.advance(out.get_ref(), written);
            }
            file_copied += plan.len as u64;
        } else {
            let data = plan.data();
            if data.len() != plan.len {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("tensor `{name}`: the plan gave {} bytes but announced {}", data.len(), plan.len),
                ));
            }
            out.write_all(&data)?;
            written += plan.len as u64;
            // What the buffer still holds has not reached the file yet.
            writeback.advance(out.get_ref(), written - out.buffer().len() as u64);
        }
    }
    out.flush()?;
    Ok(file_copied)
}

/// Starts the disk writes of the output while it is still being produced
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)` every [`Writeback::STEP`]
/// bytes), so that the final fsync finds little left to do and copying
/// overlaps with the disk. It neither waits nor replaces the fsync: it is
/// only a hint, and its errors are ignored (the fsync reports real ones).
#[derive(Default)]
struct Writeback {
    /// Bytes of the file whose writeback has been started.
    started: u64,
}

impl Writeback {
    const STEP: u64 = 32 << 20;

    fn advance(&mut self, file: &File, in_file: u64) {
        if in_file < self.started + Self::STEP {
            return;
        }
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let (offset, len) = (self.started as libc::off64_t, (in_file - self.started) as libc::off64_t);
            // SAFETY: a plain system call on a descriptor that `file` keeps open.
            unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE) };
        }
        #[cfg(not(target_os = "linux"))]
        let _ = file;
        self.started = in_file;
    }
}

/// Whether `a` and `b` name the same existing file (links followed).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Maps a file read-only (an empty file gives an empty slice).
pub fn map_file(path: &Path) -> Result<Mapped> {
    let file = tensafe::open_regular(path).map_err(|source| Error::Io { path: path.to_owned(), source })?;
    let len = file.metadata().map_err(|source| Error::Io { path: path.to_owned(), source })?.len();
    if len == 0 {
        return Ok(Mapped { map: None, file });
    }
    // SAFETY: the mapping is read-only and private to this process. Another
    // process truncating the file while it is mapped could fault the read, as
    // with any mapped reader; the data are validated before use either way.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io { path: path.to_owned(), source })?;
    Ok(Mapped { map: Some(map), file })
}

/// A read-only mapped input file (its bytes through `Deref`).
pub struct Mapped {
    map: Option<memmap2::Mmap>,
    file: File,
}

impl Mapped {
    /// The file and the offset in it of `bytes`, when they are part of this
    /// mapping (inflated zip records, for one, are not).
    fn locate(&self, bytes: &[u8]) -> Option<(&File, u64)> {
        let base = self.as_ptr().addr();
        let at = bytes.as_ptr().addr().checked_sub(base)?;
        (at.checked_add(bytes.len())? <= self.len()).then_some((&self.file, at as u64))
    }
}

impl std::ops::Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
}

/// Converts one checkpoint file to one safetensors file. Refuses to write
/// over the input itself.
pub fn convert_file(input: &Path, output: &Path, options: &ConvertOptions) -> Result<ConvertReport> {
    let mut staged = StagedWrites::default();
    let report = convert_file_staged(input, output, options, &mut staged)?;
    staged.commit()?;
    Ok(report)
}

/// [`convert_file`], its output moved into place when `staged` is committed.
fn convert_file_staged(input: &Path, output: &Path, options: &ConvertOptions, staged: &mut StagedWrites) -> Result<ConvertReport> {
    if same_file(input, output) {
        let source = io::Error::new(io::ErrorKind::InvalidInput, "is the input itself: write the conversion elsewhere");
        return Err(Error::Io { path: output.to_owned(), source });
    }
    let bytes = map_file(input)?;
    let ck = container::load(&bytes, &options.load).map_err(|e| in_file(e, input))?;
    let planned = plan_checkpoint(&ck, options).map_err(|e| in_file(e, input))?;
    let file_copied = write_planned(&planned, Some(&bytes), output, staged)?;
    Ok(ConvertReport { file_copied_bytes: file_copied, ..planned.report })
}

/// `e` naming the input file it comes from (I/O and write errors already
/// name their file).
fn in_file(e: Error, path: &Path) -> Error {
    match e {
        Error::Container(m) => Error::Container(format!("{}: {m}", path.display())),
        Error::Unsupported(m) => Error::Unsupported(format!("{}: {m}", path.display())),
        e @ (Error::Pickle(_) | Error::Tensor { .. } | Error::Structure(_) | Error::Limit(_)) => Error::InFile { path: path.to_owned(), source: Box::new(e) },
        other => other,
    }
}

/// What a sharded conversion wrote.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ShardedReport {
    /// Input shard → output shard and its report.
    pub shards: Vec<(String, String, ConvertReport)>,
    /// The index written.
    pub index: PathBuf,
    /// Sum of tensor bytes.
    pub total_size: u64,
}

/// Converts a sharded checkpoint (`pytorch_model.bin.index.json` and its
/// shards) into `out_dir`: `model-0000i-of-0000n.safetensors` and
/// `model.safetensors.index.json`, as transformers names them. The input
/// index must agree with the shards: every tensor where it says, none missing.
/// Nothing in `out_dir` is replaced before every shard is converted (a
/// refused shard leaves it as it was); then what remains there of an
/// earlier checkpoint is removed (`tensafe::remove_stale_files`).
pub fn convert_sharded(index: &Path, out_dir: &Path, options: &ConvertOptions) -> Result<ShardedReport> {
    let (input, shard_names) = read_shard_index(index)?;
    let shard_names: Vec<&str> = shard_names.iter().map(String::as_str).collect();
    let dir = index.parent().unwrap_or(Path::new("."));
    let created = create_folders(out_dir)?;
    let result = convert_shards(&input, &shard_names, dir, out_dir, options);
    if result.is_err() {
        // Leaving them empty would look like a conversion that wrote nothing.
        // Deepest first; a folder something else put files in stays.
        created.iter().rev().try_for_each(std::fs::remove_dir).ok();
    }
    result
}

/// A sharded checkpoint's index (`pytorch_model.bin.index.json`) and the
/// names of its shard files, sorted, each once (beside the index).
pub fn read_shard_index(index: &Path) -> Result<(tensafe::ShardIndex, Vec<String>)> {
    let text = tensafe::read_index_text(index).map_err(|source| Error::Io { path: index.to_owned(), source })?;
    let parsed = tensafe::ShardIndex::parse(&text).map_err(|e| Error::Structure(format!("{}: {e}", index.display())))?;
    let mut shard_names: Vec<String> = parsed.weight_map.values().cloned().collect();
    shard_names.sort();
    shard_names.dedup();
    Ok((parsed, shard_names))
}

/// Creates `path` and the folders above it that are missing, and returns
/// the ones this call created, outermost first (by path as written:
/// `new/../old` creates `new` only if it was missing, and never lists `old`).
fn create_folders(path: &Path) -> Result<Vec<&Path>> {
    let mut created = Vec::new();
    let mut ancestors: Vec<&Path> = path.ancestors().filter(|d| !d.as_os_str().is_empty()).collect();
    ancestors.reverse();
    for folder in ancestors {
        match std::fs::create_dir(folder) {
            Ok(()) => created.push(folder),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && folder.is_dir() => {}
            Err(mut source) => {
                created.iter().rev().try_for_each(std::fs::remove_dir).ok();
                if source.kind() == io::ErrorKind::AlreadyExists {
                    source = io::Error::new(io::ErrorKind::AlreadyExists, "it exists and is not a folder");
                }
                // The output's fault, not the input's.
                return Err(Error::Write(tensafe::Error::Io { context: "creating the output folder".into(), source }.in_file(folder)));
            }
        }
    }
    Ok(created)
}

/// [`convert_sharded`] into an existing `out_dir`.
fn convert_shards(input: &tensafe::ShardIndex, shard_names: &[&str], dir: &Path, out_dir: &Path, options: &ConvertOptions) -> Result<ShardedReport> {
    let n = shard_names.len();
    let mut report = ShardedReport::default();
    let mut output = tensafe::ShardIndex { metadata: input.metadata.clone(), weight_map: BTreeMap::new() };
    // Names written, and names left out as copies of another (`dedupe`).
    let mut accounted: BTreeSet<String> = BTreeSet::new();
    let mut staged = StagedWrites::default();
    for (i, shard) in shard_names.iter().enumerate() {
        let out_name = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        let shard_report = convert_file_staged(&dir.join(shard), &out_dir.join(&out_name), options, &mut staged)?;
        for t in &shard_report.tensors {
            match input.weight_map.get(&t.name) {
                Some(s) if s == shard => {}
                Some(other) => {
                    return Err(Error::Structure(format!("tensor `{}` is in {shard} but the index maps it to {other}", t.name)));
                }
                None => return Err(Error::Structure(format!("tensor `{}` in {shard} is missing from the index", t.name))),
            }
            output.weight_map.insert(t.name.clone(), out_name.clone());
            accounted.insert(t.name.clone());
            report.total_size += t.bytes as u64;
        }
        // A removed copy is in no file, so the new index does not list it.
        accounted.extend(shard_report.deduplicated.iter().map(|(removed, _)| removed.clone()));
        report.shards.push((shard.to_string(), out_name, shard_report));
    }
    if let Some((name, shard)) = input.weight_map.iter().find(|(name, _)| !accounted.contains(*name)) {
        return Err(Error::Structure(format!("the index maps `{name}` to {shard} but that shard does not hold it")));
    }
    output.metadata.insert("total_size".into(), report.total_size.into());
    let out_index = out_dir.join(tensafe::INDEX_FILE);
    let body = output.to_json();
    staged.write(&out_index, |w| w.write_all(body.as_bytes()))?;
    staged.commit()?;
    let written: Vec<String> = report.shards.iter().map(|(_, out_name, _)| out_name.clone()).collect();
    tensafe::remove_stale_files(out_dir, &written, true)?;
    report.index = out_index;
    Ok(report)
}

/// The torch dtype → safetensors dtype table, for documentation and tests.
pub fn dtype_table() -> Vec<(&'static str, Option<&'static str>)> {
    crate::names::TORCH_DTYPES.iter().map(|d: &TorchDtype| (d.name, d.safetensors().map(Dtype::code))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_folders_lists_only_what_it_created() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("old")).unwrap();
        // `..` through a folder this call creates: `old` was there before.
        let path = tmp.path().join("new/../old/sub");
        let created = create_folders(&path).unwrap();
        assert_eq!(created, [tmp.path().join("new"), path.clone()]);
        assert!(create_folders(&path).unwrap().is_empty());
        // A file in the way: an error, and nothing left behind.
        std::fs::write(tmp.path().join("file"), b"").unwrap();
        assert!(create_folders(&tmp.path().join("a/b/../../file/c")).is_err());
        assert!(!tmp.path().join("a").exists());
    }
}
