//! `tensafe diff A B`: tensors added, removed, or changed in dtype, shape or
//! content, and, between two safetensors files or checkpoints, metadata
//! entries. Either side may be a safetensors file or checkpoint (a
//! directory or index, local or remote) or a torch checkpoint (a file, or a
//! sharded one; read with the non-executing converter and `convert`'s
//! reading options), so a conversion can be proven against its source.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use serde::Serialize;
use serde_json::json;
use tensafe::{Dtype, MmapFile, View};
use tensafe_pickle::ConvertOptions;
use tensafe_remote::{RemoteCheckpoint, RemoteOptions};

/// Arguments of `tensafe diff`.
#[derive(Args)]
pub struct DiffArgs {
    /// The first file or folder (safetensors, or a torch checkpoint, sharded
    /// or not, read as `convert` reads it), or the URL of a safetensors file
    /// or checkpoint (s3://, gs://, az://, http(s)://).
    a: PathBuf,
    /// The second file or folder, of any kind the first may be.
    b: PathBuf,
    /// How a torch checkpoint side is read, as `convert` reads it.
    #[command(flatten)]
    reading: crate::convert::ReadingArgs,
    /// Print the differences as JSON.
    #[arg(long)]
    json: bool,
}

struct Tensor<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Cow<'a, [u8]>,
}

type Tensors<'a> = BTreeMap<String, Tensor<'a>>;

/// What one side of the comparison holds.
struct Side<'a> {
    /// "safetensors" or "torch checkpoint".
    kind: &'static str,
    tensors: Tensors<'a>,
    /// A safetensors file's `__metadata__` (a checkpoint's first shard's);
    /// `None` for a torch checkpoint, which has none to compare.
    metadata: Option<BTreeMap<String, String>>,
}

impl<'a> Side<'a> {
    fn safetensors(tensors: Tensors<'a>, header: Option<&tensafe::Header>) -> Side<'a> {
        let metadata = header.and_then(tensafe::Header::metadata).map(|m| m.iter().cloned().collect()).unwrap_or_default();
        Side { kind: "safetensors", tensors, metadata: Some(metadata) }
    }
}

/// Calls `f` with what `path` holds: a safetensors checkpoint (directory
/// or index) or file if it parses as one, else a torch checkpoint (a file,
/// a sharded one's index or folder, or a folder holding
/// `pytorch_model.bin`) read with `options`; or a URL of a safetensors file
/// or checkpoint.
fn with_tensors<R>(path: &Path, options: &ConvertOptions, f: impl FnOnce(&Side<'_>) -> R) -> Result<R, String> {
    if let Some(url) = crate::remote::url(path) {
        return with_remote_tensors(url, f);
    }
    let (st_error, files) = if tensafe::is_checkpoint_path(path) {
        match tensafe::ShardedCheckpoint::open(path) {
            Ok(checkpoint) => return with_checkpoint_tensors(checkpoint, f),
            Err(e) => match torch_checkpoint_files(path) {
                Some(files) => (e, files),
                // No torch checkpoint there: what is wrong is the safetensors one.
                None => return Err(e.to_string()),
            },
        }
    } else {
        match MmapFile::open(path) {
            Ok(file) => {
                let tensors = file
                    .tensors()
                    .map(|(name, v)| (name.to_owned(), Tensor { dtype: v.dtype(), shape: v.shape().to_vec(), data: Cow::Borrowed(v.data()) }))
                    .collect();
                return Ok(f(&Side::safetensors(tensors, Some(file.header()))));
            }
            Err(e) => (e, vec![path.to_owned()]),
        }
    };
    with_pickle_tensors(&files, options, &st_error, f)
}

/// The files of the torch checkpoint a folder or index `path` names: the
/// shards of a torch index (one listing files that are not `.safetensors`),
/// or a folder's `pytorch_model.bin`; `None` where it names none.
fn torch_checkpoint_files(path: &Path) -> Option<Vec<PathBuf>> {
    if let Some(index) = crate::convert::sharded_index(path) {
        let (_, shards) = tensafe_pickle::read_shard_index(&index).ok()?;
        if shards.iter().all(|shard| shard.ends_with(".safetensors")) {
            return None;
        }
        let dir = index.parent().unwrap_or(Path::new("."));
        return Some(shards.iter().map(|shard| dir.join(shard)).collect());
    }
    let single = crate::convert::single_input(path);
    (single != path).then(|| vec![single])
}

/// Calls `f` with the tensors of a local sharded safetensors checkpoint,
/// each shard mapped.
fn with_checkpoint_tensors<R>(checkpoint: tensafe::ShardedCheckpoint, f: impl FnOnce(&Side<'_>) -> R) -> Result<R, String> {
    let places: Vec<(usize, String, (usize, usize))> = checkpoint.iter().map(|(shard, name, info)| (shard, name.to_owned(), info.data_offsets)).collect();
    let shards: Vec<MmapFile> = checkpoint.into_shards().into_iter().map(MmapFile::from_pread).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    let tensors = places
        .into_iter()
        .map(|(shard, name, (begin, end))| {
            let info = shards[shard].header().info(&name).expect("the checkpoint lists it in this shard");
            let tensor = Tensor { dtype: info.dtype, shape: info.shape.clone(), data: Cow::Borrowed(&shards[shard].data()[begin..end]) };
            (name, tensor)
        })
        .collect();
    Ok(f(&Side::safetensors(tensors, shards.first().map(MmapFile::header))))
}

/// Calls `f` with the tensors of torch checkpoint files (one file, or a
/// sharded checkpoint's shards) as `convert` would write them.
fn with_pickle_tensors<R>(files: &[PathBuf], options: &ConvertOptions, st_error: &tensafe::Error, f: impl FnOnce(&Side<'_>) -> R) -> Result<R, String> {
    let maps = files.iter().map(|path| tensafe_pickle::map_file(path).map_err(|e| e.to_string())).collect::<Result<Vec<_>, _>>()?;
    let checkpoints = maps
        .iter()
        .zip(files)
        .map(|(bytes, path)| {
            tensafe_pickle::load(bytes, &options.load)
                .map_err(|e| format!("{}: neither safetensors ({st_error}) nor a torch checkpoint ({e})", path.display()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let planned = checkpoints
        .iter()
        .zip(files)
        .map(|(checkpoint, path)| tensafe_pickle::plan_checkpoint(checkpoint, options).map_err(|e| format!("{}: {e}", path.display())))
        .collect::<Result<Vec<_>, _>>()?;
    let mut tensors = Tensors::new();
    for (plan, path) in planned.iter().zip(files) {
        for (name, p) in &plan.tensors {
            if tensors.insert(name.clone(), Tensor { dtype: p.dtype(), shape: p.shape().to_vec(), data: p.data() }).is_some() {
                return Err(format!("{}: tensor `{name}` is in an earlier shard too", path.display()));
            }
        }
    }
    Ok(f(&Side { kind: "torch checkpoint", tensors, metadata: None }))
}

/// Calls `f` with the tensors of a remote safetensors file or sharded
/// checkpoint, downloaded into memory (with concurrent range requests).
fn with_remote_tensors<R>(url: &str, f: impl FnOnce(&Side<'_>) -> R) -> Result<R, String> {
    let checkpoint = RemoteCheckpoint::open(url, &RemoteOptions::default()).map_err(|e| e.to_string())?;
    let data = crate::remote::with_transfer_progress("download", || {
        checkpoint
            .shards()
            .iter()
            .map(|shard| {
                let mut bytes = vec![0u8; shard.header().data_len()];
                shard.read_data_into(&mut bytes, None).map(|_| bytes).map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, _>>()
    })?;
    let tensors = checkpoint
        .iter()
        .map(|(shard, name, info)| {
            let (begin, end) = info.data_offsets;
            (name.to_owned(), Tensor { dtype: info.dtype, shape: info.shape.clone(), data: Cow::Borrowed(&data[shard][begin..end]) })
        })
        .collect();
    Ok(f(&Side::safetensors(tensors, checkpoint.shards().first().map(|shard| shard.header()))))
}

#[derive(Serialize)]
struct Change {
    name: String,
    change: &'static str,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_abs_difference: Option<Magnitude>,
}

/// The largest difference between two elements: exact for integers (an
/// `f64` cannot tell 2^62 from 2^62 + 1), a float otherwise. In JSON a
/// number, or `"inf"`/`"nan"`, which JSON numbers cannot be.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Magnitude {
    Int(u64),
    Float(f64),
}

impl std::fmt::Display for Magnitude {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Magnitude::Int(i) => write!(f, "{i}"),
            Magnitude::Float(x) => write!(f, "{x}"),
        }
    }
}

impl Serialize for Magnitude {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match *self {
            Magnitude::Int(i) => serializer.serialize_u64(i),
            Magnitude::Float(x) if x.is_nan() => serializer.serialize_str("nan"),
            Magnitude::Float(x) if x.is_infinite() => serializer.serialize_str("inf"),
            Magnitude::Float(x) => serializer.serialize_f64(x),
        }
    }
}

/// Runs the subcommand. Exit codes: 0 same tensors (names, dtypes, shapes
/// and bytes) and, between safetensors sides, the same metadata; 1
/// differences; 2 a file could not be read.
pub fn run(args: &DiffArgs) -> ExitCode {
    let options = args.reading.options(false);
    let result = with_tensors(&args.a, &options, |a| {
        with_tensors(&args.b, &options, |b| {
            let changes = compare(a, b);
            let changed = changes.iter().filter(|c| matches!(c.change, "dtype" | "shape" | "content")).count();
            let identical = a.tensors.keys().filter(|k| b.tensors.contains_key(*k)).count() - changed;
            (a.kind, a.tensors.len(), b.kind, b.tensors.len(), changes, identical)
        })
    })
    .and_then(|inner| inner);
    let (kind_a, na, kind_b, nb, changes, identical) = match result {
        Ok(r) => r,
        Err(e) => {
            say_err!("tensafe diff: {e}");
            return ExitCode::from(2);
        }
    };
    if args.json {
        let out = json!({
            "a": {"path": args.a.display().to_string(), "kind": kind_a, "tensors": na},
            "b": {"path": args.b.display().to_string(), "kind": kind_b, "tensors": nb},
            "identical": identical,
            "changes": changes,
        });
        crate::emit_json(&out);
    } else {
        say!("a: {} ({kind_a}, {})", args.a.display(), crate::count(na, "tensor"));
        say!("b: {} ({kind_b}, {})", args.b.display(), crate::count(nb, "tensor"));
        for c in &changes {
            let mark = match c.change {
                "added" => "+",
                "removed" => "-",
                _ => "~",
            };
            say!("{mark} {:<8} {}  {}", c.change, tensafe::Printable(&c.name), c.detail);
        }
        say!("{}, {}", crate::count(identical, "identical tensor"), crate::count(changes.len(), "difference"));
    }
    if changes.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

fn compare(a: &Side<'_>, b: &Side<'_>) -> Vec<Change> {
    let (a_meta, b_meta) = (&a.metadata, &b.metadata);
    let (a, b) = (&a.tensors, &b.tensors);
    let mut out = Vec::new();
    for (name, ta) in a {
        let Some(tb) = b.get(name) else {
            out.push(Change { name: name.clone(), change: "removed", detail: format!("{} {:?}", ta.dtype.code(), ta.shape), max_abs_difference: None });
            continue;
        };
        if ta.dtype != tb.dtype {
            out.push(Change { name: name.clone(), change: "dtype", detail: format!("{} → {}", ta.dtype.code(), tb.dtype.code()), max_abs_difference: None });
        } else if ta.shape != tb.shape {
            out.push(Change { name: name.clone(), change: "shape", detail: format!("{:?} → {:?}", ta.shape, tb.shape), max_abs_difference: None });
        } else if ta.data != tb.data {
            let (differing, elements, max) = content_difference(ta.dtype, &ta.data, &tb.data);
            let max_text = max.map(|m| format!(", max abs difference {m}")).unwrap_or_default();
            out.push(Change {
                name: name.clone(),
                change: "content",
                detail: format!("{} {:?}: {differing} of {elements} elements differ{max_text}", ta.dtype.code(), ta.shape),
                max_abs_difference: max,
            });
        }
    }
    for (name, tb) in b {
        if !a.contains_key(name) {
            out.push(Change { name: name.clone(), change: "added", detail: format!("{} {:?}", tb.dtype.code(), tb.shape), max_abs_difference: None });
        }
    }
    // Loaders read metadata too (transformers checks `format`). A torch
    // checkpoint has none to compare with a conversion's.
    if let (Some(a_meta), Some(b_meta)) = (a_meta, b_meta) {
        let keys: std::collections::BTreeSet<&String> = a_meta.keys().chain(b_meta.keys()).collect();
        for key in keys {
            // Quoted and escaped once (Debug), as the line's pass leaves backslashes be.
            let shown = |value: &String| format!("{value:?}");
            let detail = match (a_meta.get(key), b_meta.get(key)) {
                (Some(x), Some(y)) if x == y => continue,
                (Some(x), Some(y)) => format!("{} → {}", shown(x), shown(y)),
                (Some(x), None) => format!("{} removed", shown(x)),
                (None, Some(y)) => format!("{} added", shown(y)),
                (None, None) => unreachable!("a key of either map"),
            };
            out.push(Change { name: key.clone(), change: "metadata", detail, max_abs_difference: None });
        }
    }
    out
}

fn f16_to_f64(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as f64;
    sign * match exp {
        0 => frac * 2f64.powi(-24),
        31 if frac == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1.0 + frac / 1024.0) * 2f64.powi(e - 15),
    }
}

/// Decodes element `i` of an integer dtype (bool included) exactly.
fn integer(dtype: Dtype, d: &[u8], i: usize) -> Option<i128> {
    let w = dtype.bits() / 8;
    let b = d.get(i * w..(i + 1) * w)?;
    Some(match dtype {
        Dtype::I64 => i64::from_le_bytes(b.try_into().ok()?).into(),
        Dtype::I32 => i32::from_le_bytes(b.try_into().ok()?).into(),
        Dtype::I16 => i16::from_le_bytes(b.try_into().ok()?).into(),
        Dtype::I8 => (b[0] as i8).into(),
        Dtype::U64 => u64::from_le_bytes(b.try_into().ok()?).into(),
        Dtype::U32 => u32::from_le_bytes(b.try_into().ok()?).into(),
        Dtype::U16 => u16::from_le_bytes(b.try_into().ok()?).into(),
        Dtype::U8 | Dtype::Bool => b[0].into(),
        _ => return None,
    })
}

/// Decodes element `i` of a float dtype, for those where that is simple.
fn float(dtype: Dtype, d: &[u8], i: usize) -> Option<f64> {
    let w = dtype.bits() / 8;
    let b = d.get(i * w..(i + 1) * w)?;
    Some(match dtype {
        Dtype::F64 => f64::from_le_bytes(b.try_into().ok()?),
        Dtype::F32 => f32::from_le_bytes(b.try_into().ok()?) as f64,
        Dtype::F16 => f16_to_f64(u16::from_le_bytes(b.try_into().ok()?)),
        Dtype::BF16 => f32::from_bits((u16::from_le_bytes(b.try_into().ok()?) as u32) << 16) as f64,
        _ => return None,
    })
}

/// The larger of two differences, NaN as soon as either is (`f64::max`
/// would drop a NaN found earlier).
fn larger(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() { f64::NAN } else { a.max(b) }
}

/// (differing elements, element count, max abs difference where defined).
fn content_difference(dtype: Dtype, a: &[u8], b: &[u8]) -> (usize, usize, Option<Magnitude>) {
    if dtype.bits() < 8 {
        // Packed elements (F4: two a byte; F6: four in three bytes), compared
        // as fields of `bits` bits, lowest bits first.
        let bits = dtype.bits();
        let n = a.len() * 8 / bits;
        let bit = |i: usize| (a[i / 8] ^ b[i / 8]) >> (i % 8) & 1 != 0;
        let differing = (0..n).filter(|e| (e * bits..(e + 1) * bits).any(bit)).count();
        return (differing, n, None);
    }
    let width = dtype.bits() / 8;
    let n = a.len() / width;
    let differs = |i: usize| a[i * width..(i + 1) * width] != b[i * width..(i + 1) * width];
    if dtype == Dtype::C64 {
        let part = |d: &[u8], k: usize| f32::from_le_bytes(d[k..k + 4].try_into().expect("4 bytes")) as f64;
        let gap = |i: usize| (part(a, i * 8) - part(b, i * 8)).hypot(part(a, i * 8 + 4) - part(b, i * 8 + 4));
        let (differing, max) = largest_gap(n, differs, gap, 0.0, larger);
        (differing, n, Some(Magnitude::Float(max)))
    } else if integer(dtype, &[0; 8], 0).is_some() {
        // |x - y| of two 64-bit integers fits 64 bits unsigned.
        let gap = |i: usize| (integer(dtype, a, i).expect("an element") - integer(dtype, b, i).expect("an element")).unsigned_abs() as u64;
        let (differing, max) = largest_gap(n, differs, gap, 0, u64::max);
        (differing, n, Some(Magnitude::Int(max)))
    } else if float(dtype, &[0; 8], 0).is_some() {
        let gap = |i: usize| (float(dtype, a, i).expect("an element") - float(dtype, b, i).expect("an element")).abs();
        let (differing, max) = largest_gap(n, differs, gap, 0.0, larger);
        (differing, n, Some(Magnitude::Float(max)))
    } else {
        ((0..n).filter(|&i| differs(i)).count(), n, None)
    }
}

/// Of elements `0..n`: how many differ, and the largest `gap` among them, in
/// one pass that keeps nothing per element (a whole embedding may differ).
fn largest_gap<T>(n: usize, differs: impl Fn(usize) -> bool, gap: impl Fn(usize) -> T, zero: T, larger: impl Fn(T, T) -> T) -> (usize, T) {
    (0..n).filter(|&i| differs(i)).fold((0, zero), |(count, max), i| (count + 1, larger(max, gap(i))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_floats_decode() {
        assert_eq!(f16_to_f64(0x3c00), 1.0);
        assert_eq!(f16_to_f64(0xc000), -2.0);
        assert_eq!(f16_to_f64(0x0001), 2f64.powi(-24));
        assert!(f16_to_f64(0x7c00).is_infinite());
    }

    #[test]
    fn content_differences_measure_the_largest_gap() {
        let a: Vec<u8> = [1.0f32, 2.0, 3.0].iter().flat_map(|f| f.to_le_bytes()).collect();
        let b: Vec<u8> = [1.0f32, 2.5, 1.0].iter().flat_map(|f| f.to_le_bytes()).collect();
        assert_eq!(content_difference(Dtype::F32, &a, &b), (2, 3, Some(Magnitude::Float(2.0))));
        assert_eq!(content_difference(Dtype::F8E4M3, &[1, 2], &[1, 3]), (1, 2, None));
        // A NaN stays the answer whatever comes after it.
        let nan_first: Vec<u8> = [f32::NAN, 2.0, 5.0].iter().flat_map(|f| f.to_le_bytes()).collect();
        let (differing, n, max) = content_difference(Dtype::F32, &a, &nan_first);
        assert!((differing, n) == (2, 3) && matches!(max, Some(Magnitude::Float(x)) if x.is_nan()));
        // F4 packs two elements a byte: elements are counted, not bytes.
        assert_eq!(content_difference(Dtype::F4, &[0x12, 0x34], &[0x13, 0x34]), (1, 4, None));
        assert_eq!(content_difference(Dtype::F4, &[0x12], &[0x21]), (2, 2, None));
        assert_eq!(content_difference(Dtype::F6E2M3, &[0, 0, 0x80], &[0, 0, 0]), (1, 4, None));
    }

    #[test]
    fn integer_differences_are_exact() {
        let i64s = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (a, b) = (i64s(&[1 << 62, 5]), i64s(&[(1 << 62) + 1, 5]));
        assert_eq!(content_difference(Dtype::I64, &a, &b), (1, 2, Some(Magnitude::Int(1))));
        let (a, b) = (i64s(&[i64::MIN]), i64s(&[i64::MAX]));
        assert_eq!(content_difference(Dtype::I64, &a, &b), (1, 1, Some(Magnitude::Int(u64::MAX))));
        let (a, b) = (0u64.to_le_bytes(), u64::MAX.to_le_bytes());
        assert_eq!(content_difference(Dtype::U64, &a, &b), (1, 1, Some(Magnitude::Int(u64::MAX))));
        assert_eq!(content_difference(Dtype::I8, &[0x80], &[0x7f]), (1, 1, Some(Magnitude::Int(255))));
        // In JSON: integers as numbers, non-finite floats as strings.
        let json = |m: Magnitude| serde_json::to_string(&m).unwrap();
        assert_eq!(json(Magnitude::Int(u64::MAX)), "18446744073709551615");
        assert_eq!((json(Magnitude::Float(f64::INFINITY)), json(Magnitude::Float(f64::NAN))), ("\"inf\"".into(), "\"nan\"".into()));
    }
}
