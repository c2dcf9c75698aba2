//! Torch checkpoint containers, detected by content as `torch.load` does:
//! the first four bytes decide zip; else a tar header; else the legacy
//! stacked-pickle stream. This module loads them strictly for conversion.

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;
use std::rc::Rc;

use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::value::{Heap, Object, Storage, Value};
use crate::vm::{Mode, PidSchema, StorageTable, Vm, VmOptions};
use crate::zip;

/// The legacy stream's magic number, as LONG1 little-endian bytes.
pub(crate) const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
/// The legacy stream's protocol version.
pub(crate) const LEGACY_PROTOCOL: i64 = 1001;

/// What a file is, judged by its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Starts with a zip local header: torch's zip path.
    Zip,
    /// A tar archive: a first block that Python's `tarfile` takes for a
    /// header ([`is_tar_header`]), which is what makes torch read a legacy
    /// file as tar rather than as a pickle stream.
    Tar,
    /// A NumPy `.npy` file.
    Npy,
    /// A compressed wrapper torch cannot open directly.
    Wrapper(&'static str),
    /// Anything else: a pickle stream (torch's legacy path).
    Stream,
}

/// Detects the container from its first bytes, never from a file name.
pub fn detect(bytes: &[u8]) -> Kind {
    if bytes.starts_with(b"PK\x03\x04") {
        Kind::Zip
    } else if is_tar_header(bytes) {
        Kind::Tar
    } else if bytes.starts_with(b"\x93NUMPY") {
        Kind::Npy
    } else if let Some(wrapper) = wrapper_kind(bytes) {
        Kind::Wrapper(wrapper)
    } else {
        Kind::Stream
    }
}

/// The compressed format the file starts with, by its magic, if any.
pub fn wrapper_kind(bytes: &[u8]) -> Option<&'static str> {
    Some(if bytes.starts_with(b"\x1f\x8b") {
        "gzip"
    } else if bytes.starts_with(b"7z\xbc\xaf\x27\x1c") {
        "7z"
    } else if is_bzip2(bytes) {
        "bzip2"
    } else if bytes.starts_with(b"\xfd7zXZ\x00") {
        "xz"
    } else if bytes.starts_with(b"\x28\xb5\x2f\xfd") {
        "zstd"
    } else if bytes.starts_with(b"\x04\x22\x4d\x18") {
        "lz4"
    } else if is_zlib(bytes) {
        "zlib"
    } else if bytes.starts_with(b"ZF") {
        // joblib's old compressed format, which joblib.load still reads
        // (`ZF`: as a pickle, `Z` is no opcode).
        "joblib zfile"
    } else if bytes.starts_with(b"\x5d\x00") {
        // The .lzma ("alone") header joblib writes: properties byte 0x5d, then
        // a little-endian dictionary size; joblib goes by these two bytes. As
        // a pickle, `]` then 0x00 is invalid.
        "lzma"
    } else {
        return None;
    })
}

/// Whether the file starts as a bzip2 stream: `BZh`, a block size digit,
/// then a block's or the end's magic. `BZh` alone is no proof: `B` is also
/// the pickle opcode BINBYTES.
fn is_bzip2(bytes: &[u8]) -> bool {
    const BLOCK: &[u8] = &[0x31, 0x41, 0x59, 0x26, 0x53, 0x59];
    const END: &[u8] = &[0x17, 0x72, 0x45, 0x38, 0x50, 0x90];
    bytes.len() >= 10 && bytes.starts_with(b"BZh") && (b'1'..=b'9').contains(&bytes[3]) && (&bytes[4..10] == BLOCK || &bytes[4..10] == END)
}

/// Whether the first 512 bytes are a tar header as Python's `tarfile`
/// (which torch's legacy loader tries first) accepts one
/// (`TarInfo.frombuf`): not all zero, a checksum field that equals the sum
/// of the block's bytes, unsigned or signed, with the field itself counted
/// as spaces, and numeric fields (mode, ids, size, time, device numbers)
/// that read as numbers. The `ustar` magic is not needed (old tar headers
/// lack it) and not enough. Where `tarfile` refuses the file, torch
/// unpickles it from its first byte; it also does when a later step of the
/// tar path fails, which is why the scanner also reads a tar file from its
/// first byte as a pickle.
pub fn is_tar_header(bytes: &[u8]) -> bool {
    let Some(block) = bytes.get(..512) else { return false };
    if block.iter().all(|&b| b == 0) {
        return false;
    }
    let numeric = [100..108, 108..116, 116..124, 124..136, 136..148, 329..337, 337..345];
    if numeric.into_iter().any(|field| tar_number(&block[field]).is_none()) {
        return false;
    }
    let Some(stored) = tar_number(&block[148..156]) else { return false };
    let spaces = 8 * i64::from(b' ');
    let outside = || block[..148].iter().chain(&block[156..]);
    let unsigned = spaces + outside().map(|&b| i64::from(b)).sum::<i64>();
    let signed = spaces + outside().map(|&b| i64::from(b as i8)).sum::<i64>();
    stored == unsigned || stored == signed
}

/// A numeric header field as `tarfile`'s `nti` reads it: base-256 when its
/// first byte is 0o200 or 0o377, else ASCII octal text up to the first NUL.
fn tar_number(field: &[u8]) -> Option<i64> {
    if field[0] == 0o200 || field[0] == 0o377 {
        // Big-endian in the remaining bytes, negative for 0o377; more than
        // fits in an i64 is still a number to Python.
        let magnitude = field[1..].iter().try_fold(0i64, |n, &b| n.checked_mul(256).map(|n| n + i64::from(b))).unwrap_or(i64::MAX);
        return Some(if field[0] == 0o377 { magnitude.saturating_sub(1i64 << 56) } else { magnitude });
    }
    let text = field.split(|&b| b == 0).next().unwrap_or_default();
    std::str::from_utf8(text).ok().filter(|t| t.is_ascii()).and_then(python_octal)
}

/// An integer as Python's `int(text.strip() or "0", 8)` reads it (what
/// `tarfile` does with a checksum field), so that both judge a header alike:
/// Python's whitespace (which includes \x0b and \x1c-\x1f) around it, an
/// optional sign and `0o` prefix, and single underscores between digits.
fn python_octal(text: &str) -> Option<i64> {
    let text = text.trim_matches(|c: char| c == ' ' || ('\t'..='\r').contains(&c) || ('\x1c'..='\x1f').contains(&c));
    if text.is_empty() {
        return Some(0);
    }
    let (negative, unsigned) = match text.as_bytes()[0] {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let digits = unsigned.strip_prefix("0o").or_else(|| unsigned.strip_prefix("0O")).map_or(unsigned, |rest| rest.strip_prefix('_').unwrap_or(rest));
    let octal = digits.bytes().all(|b| b == b'_' || (b'0'..=b'7').contains(&b));
    if !octal || digits.is_empty() || digits.starts_with('_') || digits.ends_with('_') || digits.contains("__") {
        return None;
    }
    let value = i64::from_str_radix(&digits.replace('_', ""), 8).ok()?;
    Some(if negative { -value } else { value })
}

/// A zlib stream header as zlib writes it (RFC 1950: deflate with a 32 KiB
/// window, so 0x78, then check bits and no preset dictionary), what joblib's
/// default compression produces. 0x78 is no pickle opcode; smaller windows
/// are left out because their first bytes (`(`, `X`, `h`) are opcodes.
fn is_zlib(bytes: &[u8]) -> bool {
    match bytes {
        [0x78, flg, ..] => u16::from_be_bytes([0x78, *flg]).is_multiple_of(31) && flg & 0x20 == 0,
        _ => false,
    }
}

/// Records that mark a zip as something `torch.load` hands to a more
/// powerful loader (or that is not a `torch.save` file at all).
pub(crate) fn foreign_archive_kind(names: &[&str]) -> Option<&'static str> {
    let has = |record: &str| names.iter().any(|n| *n == record || n.ends_with(&format!("/{record}")));
    let has_dir = |dir: &str| names.iter().any(|n| n.starts_with(&format!("{dir}/")) || n.contains(&format!("/{dir}/")));
    if has("constants.pkl") || has_dir("code") {
        Some("a TorchScript archive (torch.jit.save): loading it runs its TorchScript code")
    } else if has("model.json") || has("attributes.pkl") {
        Some("a TorchScript v1.0/1.1 archive: loading it runs its code")
    } else if has("bytecode.pkl") {
        Some("a mobile / lite-interpreter archive (.ptl): loading it runs its code")
    } else if has("archive_format") {
        Some("a torch.export (.pt2) archive")
    } else if has(".data/extern_modules") {
        Some("a torch.package archive: loading it imports its bundled Python code")
    } else {
        None
    }
}

/// How tensor data is laid out in the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `torch.save` zip (default since torch 1.6).
    Zip,
    /// The legacy stacked-pickle stream (`_use_new_zipfile_serialization=False`).
    Legacy,
}

/// A checkpoint loaded for conversion: the object tree (modelled, never
/// executed) and the storage bytes it refers to.
pub struct Checkpoint<'a> {
    /// Container format.
    pub format: Format,
    /// The objects.
    pub heap: Heap,
    /// Declared storages.
    pub storages: StorageTable,
    /// The unpickled root object.
    pub root: Value,
    /// Storage key → the record's bytes (borrowed from the input when stored).
    pub records: HashMap<Rc<str>, Cow<'a, [u8]>>,
    /// Whether storages are big-endian.
    pub big_endian: bool,
    /// Things worth telling the user that are not errors.
    pub warnings: Vec<String>,
}

/// Options for loading.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Limits.
    pub limits: Limits,
    /// Classes modelled as opaque objects instead of refused (`module.Name`
    /// or `module.*`). Never executed.
    pub allow_opaque: Vec<String>,
}

/// Loads a torch checkpoint from its bytes. Refuses anything that is not a
/// strictly valid `torch.save` zip or legacy stream.
pub fn load<'a>(bytes: &'a [u8], options: &LoadOptions) -> Result<Checkpoint<'a>> {
    match detect(bytes) {
        Kind::Zip => load_zip(bytes, options),
        Kind::Tar => Err(Error::Unsupported(
            "a legacy tar checkpoint (torch < 0.1.10): refused (torch extracts its members to disk by name); `tensafe scan` can inspect it".into(),
        )),
        Kind::Npy => Err(Error::Unsupported("a NumPy .npy file, not a torch checkpoint".into())),
        Kind::Wrapper(w) => Err(Error::Unsupported(format!(
            "a {w}-compressed file: torch.load cannot open it directly; decompress it (and scan the result) first"
        ))),
        Kind::Stream => {
            if bytes.is_empty() {
                return Err(Error::Container("empty file".into()));
            }
            if let Some(what) = text_not_a_pickle(bytes) {
                return Err(Error::Unsupported(format!("not a torch checkpoint{what}")));
            }
            if zip::has_end_record(bytes) {
                return Err(Error::Container(
                    "polyglot: the file does not start with a zip header (torch reads it as a pickle stream) but ends with a zip directory (zip tools read an archive)".into(),
                ));
            }
            load_legacy(bytes, options)
        }
    }
}

/// What a file is when it is text that no pickle starts with (a Git LFS
/// pointer, an HTML page, a JSON document), to say that rather than which
/// opcode is invalid.
pub(crate) fn text_not_a_pickle(bytes: &[u8]) -> Option<tensafe::Diagnosis> {
    use tensafe::Diagnosis;
    match Diagnosis::sniff(&bytes[..bytes.len().min(512)]) {
        what @ (Diagnosis::GitLfsPointer { .. } | Diagnosis::Html | Diagnosis::Json) => Some(what),
        _ => None,
    }
}

fn run_pickle(
    name: &str,
    data: &[u8],
    heap: &mut Heap,
    storages: &mut StorageTable,
    opts: VmOptions<'_>,
) -> Result<(Value, usize)> {
    let (outcome, _) = Vm::new(name, data, heap, storages, opts).run();
    Ok((outcome.result?, outcome.end))
}

fn load_zip<'a>(bytes: &'a [u8], options: &LoadOptions) -> Result<Checkpoint<'a>> {
    let limits = &options.limits;
    let archive = zip::read(bytes, limits).map_err(|e| Error::Container(format!("zip: {e}")))?;
    // Names that differ only in case: torch would read one of them, which is not said.
    let problems: Vec<&str> = archive.problems.iter().chain(&archive.case_collisions).map(String::as_str).collect();
    if !problems.is_empty() {
        return Err(Error::Container(format!(
            "zip: refused by the strict reader ({} problem{}): {}",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" },
            problems[..problems.len().min(5)].join("; ")
        )));
    }
    let names: Vec<&str> = archive.entries.iter().map(|e| e.name.as_str()).collect();
    if let Some(kind) = foreign_archive_kind(&names) {
        return Err(Error::Unsupported(format!("{kind}; tensafe converts torch.save checkpoints only")));
    }
    let first = names.first().ok_or_else(|| Error::Container("zip: the archive is empty".into()))?;
    let prefix = match first.split_once('/') {
        Some((p, _)) if !p.is_empty() => p.to_owned(),
        _ => return Err(Error::Container(format!("zip: the first entry `{first}` is not inside an archive folder"))),
    };
    if let Some(foreign) = names.iter().find(|n| n.strip_prefix(prefix.as_str()).is_none_or(|r| !r.starts_with('/'))) {
        return Err(Error::Container(format!(
            "zip: entry `{foreign}` is outside the archive folder `{prefix}/` that torch reads (several trees in one file)"
        )));
    }
    let mut budget = limits.max_inflate;
    let read = |name: &str, budget: &mut u64| -> Result<Option<Cow<'a, [u8]>>> {
        match archive.get(&format!("{prefix}/{name}")) {
            None => Ok(None),
            Some(e) => archive.data(bytes, e, budget).map(Some).map_err(|m| Error::Container(format!("zip: {m}"))),
        }
    };
    let mut warnings = Vec::new();
    // Version record: required, integer ≥ 1 within what torch supports.
    let version = match read("version", &mut budget)? {
        Some(v) => v,
        None => read(".data/version", &mut budget)?
            .ok_or_else(|| Error::Container(format!("zip: no `{prefix}/version` record; not a torch.save archive")))?,
    };
    let version_text = std::str::from_utf8(&version).ok().map(|s| s.strip_suffix('\n').unwrap_or(s));
    match version_text.and_then(|s| s.parse::<u32>().ok()) {
        Some(1..=3) => {}
        _ => return Err(Error::Container(format!("zip: unsupported archive version {:?}", String::from_utf8_lossy(&version)))),
    }
    let big_endian = match read("byteorder", &mut budget)?.as_deref() {
        None | Some(b"little") => false,
        Some(b"big") => true,
        Some(other) => return Err(Error::Container(format!("zip: byteorder record holds {:?}", String::from_utf8_lossy(other)))),
    };
    let pkl_name = format!("{prefix}/data.pkl");
    let entry = archive.get(&pkl_name).ok_or_else(|| Error::Container(format!("zip: no `{pkl_name}`; not a torch.save archive")))?;
    if entry.size > limits.max_pickle_bytes {
        return Err(Error::Limit(format!("`{pkl_name}` is {} bytes (limit {})", entry.size, limits.max_pickle_bytes)));
    }
    let pkl = archive.data(bytes, entry, &mut budget).map_err(|m| Error::Container(format!("zip: {m}")))?;
    let mut heap = Heap::default();
    let mut storages = StorageTable::default();
    let opts = VmOptions {
        mode: Mode::Convert,
        pids: PidSchema::Zip,
        data_only: false,
        allow_opaque: &options.allow_opaque,
        limits,
        no_trailing: true,
    };
    let (root, _) = run_pickle(&pkl_name, &pkl, &mut heap, &mut storages, opts)?;

    let mut records = HashMap::new();
    for key in &storages.order {
        let decl = &storages.by_key[key];
        let name = format!("{prefix}/data/{key}");
        let entry = archive
            .get(&name)
            .ok_or_else(|| Error::Container(format!("zip: storage `{key}` is declared but record `{name}` is missing")))?;
        let declared = decl.byte_len().expect("checked when the pid was read");
        if entry.size != declared {
            return Err(Error::Container(format!(
                "zip: record `{name}` holds {} bytes but the pickle declares {} × {} = {declared} bytes",
                entry.size,
                decl.numel,
                decl.storage_type.element_size()
            )));
        }
        let data = archive.data(bytes, entry, &mut budget).map_err(|m| Error::Container(format!("zip: {m}")))?;
        records.insert(key.clone(), data);
    }
    // Every other record: known names only (warn otherwise), CRC-checked.
    const KNOWN: &[&str] =
        &["data.pkl", "version", ".data/version", "byteorder", ".format_version", ".storage_alignment", ".data/serialization_id"];
    for e in &archive.entries {
        let local = &e.name[prefix.len() + 1..];
        let is_storage = local.strip_prefix("data/").is_some_and(|k| records.contains_key(k));
        if is_storage || local == "data.pkl" {
            continue;
        }
        if e.method == 0 {
            archive.data(bytes, e, &mut budget).map_err(|m| Error::Container(format!("zip: {m}")))?;
        }
        if !KNOWN.contains(&local) {
            warnings.push(format!("unknown record `{}` ignored", e.name));
        }
    }
    Ok(Checkpoint { format: Format::Zip, heap, storages, root, records, big_endian, warnings })
}

fn load_legacy<'a>(bytes: &'a [u8], options: &LoadOptions) -> Result<Checkpoint<'a>> {
    let limits = &options.limits;
    let mut heap = Heap::default();
    let mut storages = StorageTable::default();
    let mut pos = 0usize;
    let data_only = |no_trailing| VmOptions {
        mode: Mode::Convert,
        pids: PidSchema::None,
        data_only: true,
        allow_opaque: &[],
        limits,
        no_trailing,
    };
    let mut next = |name: &str, opts: VmOptions<'_>, heap: &mut Heap, storages: &mut StorageTable| -> Result<(Value, u64)> {
        let start = pos;
        let (v, end) = run_pickle(name, &bytes[start..], heap, storages, opts)?;
        pos = start + end;
        Ok((v, start as u64))
    };
    // The name says both what torch's legacy format keeps there and what a
    // plain pickle (torch.load's other input) keeps there: its object.
    let (magic, at) = next("legacy pickle 1 (magic number; in a plain pickle, its object)", data_only(false), &mut heap, &mut storages)?;
    if !matches!(&magic, Value::BigInt(b) if **b == LEGACY_MAGIC) {
        return Err(Error::Container(format!(
            "not a torch checkpoint: not a zip, and the first pickle (offset {at}) is {} rather than torch's magic number (a plain pickle?)",
            heap.summary(&magic, 60)
        )));
    }
    let (protocol, at) = next("legacy pickle 2 (protocol)", data_only(false), &mut heap, &mut storages)?;
    if protocol.as_int() != Some(LEGACY_PROTOCOL) || matches!(protocol, Value::Bool(_)) {
        return Err(Error::Container(format!("legacy stream: protocol pickle at offset {at} is not {LEGACY_PROTOCOL}")));
    }
    let (sys_info, at) = next("legacy pickle 3 (sys_info)", data_only(false), &mut heap, &mut storages)?;
    let little_endian = check_sys_info(&heap, &sys_info).map_err(|m| Error::Container(format!("legacy stream: sys_info pickle at offset {at}: {m}")))?;
    let opts = VmOptions {
        mode: Mode::Convert,
        pids: PidSchema::Legacy,
        data_only: false,
        allow_opaque: &options.allow_opaque,
        limits,
        no_trailing: false,
    };
    let (root, _) = next("legacy pickle 4 (object)", opts, &mut heap, &mut storages)?;
    let (keys, at) = next("legacy pickle 5 (storage keys)", data_only(false), &mut heap, &mut storages)?;
    let keys: Vec<Rc<str>> = match heap.object(&keys) {
        Some(Object::List(items)) => items.iter().map(|k| k.as_str().map(Rc::from)).collect::<Option<_>>(),
        _ => None,
    }
    .ok_or_else(|| Error::Container(format!("legacy stream: the key pickle at offset {at} is not a list of str")))?;
    if !keys.is_sorted() {
        return Err(Error::Container("legacy stream: storage keys are not sorted as torch writes them".into()));
    }
    let mut declared: Vec<&Rc<str>> = storages.order.iter().collect();
    declared.sort();
    if declared.len() != keys.len() || declared.iter().zip(&keys).any(|(a, b)| **a != *b) {
        return Err(Error::Container(format!(
            "legacy stream: the key list ({} keys) does not match the storages the object pickle declares ({})",
            keys.len(),
            declared.len()
        )));
    }
    let mut records = HashMap::new();
    for key in &keys {
        let data = legacy_storage(bytes, pos, &storages.by_key[key], little_endian)
            .map_err(|m| Error::Container(format!("legacy stream: storage `{key}` at offset {pos} {m}")))?;
        records.insert(key.clone(), Cow::Borrowed(&bytes[data.clone()]));
        pos = data.end;
    }
    let last = keys.last().map(|key| &storages.by_key[key]);
    if !legacy_tail_is_torchs(bytes.len() - pos, last) {
        return Err(Error::Container(format!("legacy stream: {} unexpected bytes after the last storage (offset {pos})", bytes.len() - pos)));
    }
    // The bytes are little-endian whatever machine wrote them.
    Ok(Checkpoint { format: Format::Legacy, heap, storages, root, records, big_endian: false, warnings: vec![] })
}

/// One storage of the legacy raw section, at `pos`: its element count (8
/// bytes), then its bytes; returns where the bytes lie. torch writes both
/// little-endian on any machine (sys_info's `little_endian` describes the
/// machine only); older torch wrote the count in the machine's order,
/// which a big-endian machine's torch reads back, so that order is taken
/// too where sys_info says big-endian.
pub(crate) fn legacy_storage(bytes: &[u8], pos: usize, decl: &Storage, machine_little_endian: bool) -> std::result::Result<Range<usize>, String> {
    let count: [u8; 8] = bytes.get(pos..pos + 8).ok_or("is cut short by the end of the file")?.try_into().expect("8 bytes");
    let numel = u64::from_le_bytes(count);
    if numel != decl.numel && (machine_little_endian || u64::from_be_bytes(count) != decl.numel) {
        return Err(format!("holds {numel} elements but the pickle declares {}", decl.numel));
    }
    let len = decl.byte_len().ok_or("has a size past 2^64 bytes")?;
    let start = pos + 8;
    let end = (start as u64).checked_add(len).filter(|&e| e <= bytes.len() as u64).ok_or_else(|| format!("({len} bytes) runs past the end of the file"))?;
    Ok(start..end as usize)
}

/// Whether `tail` bytes after the last storage are what torch's legacy
/// writer leaves: it writes every byte of a storage but counts whole
/// elements, so a byte storage viewed as a wider type (`x[:6].view(int16)`
/// of 7 bytes) is followed by less than an element, which torch's reader
/// never reads.
pub(crate) fn legacy_tail_is_torchs(tail: usize, last: Option<&Storage>) -> bool {
    tail == 0 || last.is_some_and(|storage| (tail as u64) < storage.storage_type.element_size())
}

/// `{'protocol_version': 1001, 'little_endian': bool, 'type_sizes': {str: int}}`.
fn check_sys_info(heap: &Heap, v: &Value) -> std::result::Result<bool, String> {
    let Some(Object::Dict(d)) = heap.object(v) else { return Err("not a dict".into()) };
    let mut little = None;
    for (k, val) in &d.entries {
        match (k.as_str(), val) {
            (Some("protocol_version"), Value::Int(LEGACY_PROTOCOL)) => {}
            (Some("little_endian"), Value::Bool(b)) => little = Some(*b),
            (Some("type_sizes"), Value::Obj(_)) => match heap.object(val) {
                Some(Object::Dict(sizes)) if sizes.entries.iter().all(|(k, v)| k.as_str().is_some() && matches!(v, Value::Int(_))) => {}
                _ => return Err("type_sizes is not a dict of str to int".into()),
            },
            _ => return Err(format!("unexpected entry {}: {}", heap.summary(k, 40), heap.summary(val, 40))),
        }
    }
    little.ok_or_else(|| "no little_endian entry".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_fields_read_as_python_reads_them() {
        // Expected values from Python 3.11: int(text.strip() or "0", 8), None for ValueError.
        let cases: [(&str, Option<i64>); 18] = [
            ("", Some(0)),
            (" ", Some(0)),
            ("0000000", Some(0)),
            ("  1234 ", Some(0o1234)),
            ("\x0b12\x1c", Some(0o12)),
            ("-17", Some(-0o17)),
            ("+17", Some(0o17)),
            ("0o17", Some(0o17)),
            ("0O_17", Some(0o17)),
            ("1_7", Some(0o17)),
            ("1__7", None),
            ("_17", None),
            ("17_", None),
            ("--5", None),
            ("8", None),
            ("0o", None),
            ("12 3", None),
            ("\x1f", Some(0)),
        ];
        for (text, expected) in cases {
            assert_eq!(python_octal(text), expected, "{text:?}");
        }
    }

    #[test]
    fn tar_is_what_tarfile_opens_not_what_says_ustar() {
        let mut block = vec![0u8; 512];
        block[..7].copy_from_slice(b"pickle\0");
        block[257..263].copy_from_slice(b"ustar\0");
        // A wrong checksum: tarfile refuses it, and torch unpickles the file.
        block[148..156].copy_from_slice(b"0000000\0");
        assert!(!is_tar_header(&block) && detect(&block) == Kind::Stream);
        let sum: u32 = block.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { 32 } else { u32::from(b) }).sum();
        block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        assert!(is_tar_header(&block) && detect(&block) == Kind::Tar);
        // No magic (an old tar header): still tar for tarfile.
        block[257..263].fill(0);
        let sum = sum - b"ustar".iter().map(|&b| u32::from(b)).sum::<u32>();
        block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        assert_eq!(detect(&block), Kind::Tar);
        assert!(!is_tar_header(&[0u8; 512]) && !is_tar_header(&block[..511]));
    }
}
