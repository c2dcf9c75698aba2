//! `tensafe diff A B`: tensors added, removed, or changed in dtype, shape or
//! content. Either side may be a safetensors file or a torch checkpoint
//! (read with the non-executing converter), so a conversion can be proven
//! against its source.

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
    /// The first file (safetensors, or a torch checkpoint), or the URL of a
    /// safetensors file or checkpoint (s3://, gs://, az://, http(s)://).
    a: PathBuf,
    /// The second file.
    b: PathBuf,
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

/// Calls `f` with the tensors of `path`: a safetensors file if it parses as
/// one, else a torch checkpoint; or a URL of a safetensors file or checkpoint.
fn with_tensors<R>(path: &Path, f: impl FnOnce(&str, &Tensors<'_>) -> R) -> Result<R, String> {
    if let Some(url) = crate::remote::url(path) {
        return with_remote_tensors(url, f);
    }
    let st_error = match MmapFile::open(path) {
        Ok(file) => {
            let tensors = file
                .tensors()
                .map(|(name, v)| (name.to_owned(), Tensor { dtype: v.dtype(), shape: v.shape().to_vec(), data: Cow::Borrowed(v.data()) }))
                .collect();
            return Ok(f("safetensors", &tensors));
        }
        Err(e) => e,
    };
    let bytes = tensafe_pickle::map_file(path).map_err(|e| e.to_string())?;
    let options = ConvertOptions::default();
    let ck = tensafe_pickle::load(&bytes, &options.load)
        .map_err(|e| format!("{}: neither safetensors ({st_error}) nor a torch checkpoint ({e})", path.display()))?;
    let planned = tensafe_pickle::plan_checkpoint(&ck, &options).map_err(|e| format!("{}: {e}", path.display()))?;
    let tensors = planned
        .tensors
        .iter()
        .map(|(name, p)| (name.clone(), Tensor { dtype: p.dtype(), shape: p.shape().to_vec(), data: p.data() }))
        .collect();
    Ok(f("torch checkpoint", &tensors))
}

/// Calls `f` with the tensors of a remote safetensors file or sharded
/// checkpoint, downloaded into memory (with concurrent range requests).
fn with_remote_tensors<R>(url: &str, f: impl FnOnce(&str, &Tensors<'_>) -> R) -> Result<R, String> {
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
    Ok(f("safetensors", &tensors))
}

#[derive(Serialize)]
struct Change {
    name: String,
    change: &'static str,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_abs_difference: Option<f64>,
}

/// Runs the subcommand. Exit codes: 0 same tensors (names, dtypes, shapes
/// and bytes); 1 differences; 2 a file could not be read.
pub fn run(args: &DiffArgs) -> ExitCode {
    let result = with_tensors(&args.a, |kind_a, a| {
        with_tensors(&args.b, |kind_b, b| {
            let changes = compare(a, b);
            let identical = a.keys().filter(|k| b.contains_key(*k)).count() - changes.iter().filter(|c| c.change != "added" && c.change != "removed").count();
            (kind_a.to_owned(), a.len(), kind_b.to_owned(), b.len(), changes, identical)
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
        out!("{}\n", serde_json::to_string_pretty(&out).expect("JSON values serialize"));
    } else {
        say!("a: {} ({kind_a}, {na} tensors)", args.a.display());
        say!("b: {} ({kind_b}, {nb} tensors)", args.b.display());
        for c in &changes {
            let mark = match c.change {
                "added" => "+",
                "removed" => "-",
                _ => "~",
            };
            say!("{mark} {:<8} {}  {}", c.change, c.name, c.detail);
        }
        say!("{identical} identical tensors, {} differences", changes.len());
    }
    if changes.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

fn compare(a: &Tensors<'_>, b: &Tensors<'_>) -> Vec<Change> {
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

/// Decodes element `i` as a number, for the dtypes where that is simple.
fn element(dtype: Dtype, d: &[u8], i: usize) -> Option<f64> {
    let w = dtype.bits() / 8;
    let b = d.get(i * w..(i + 1) * w)?;
    Some(match dtype {
        Dtype::F64 => f64::from_le_bytes(b.try_into().ok()?),
        Dtype::F32 => f32::from_le_bytes(b.try_into().ok()?) as f64,
        Dtype::F16 => f16_to_f64(u16::from_le_bytes(b.try_into().ok()?)),
        Dtype::BF16 => f32::from_bits((u16::from_le_bytes(b.try_into().ok()?) as u32) << 16) as f64,
        Dtype::I64 => i64::from_le_bytes(b.try_into().ok()?) as f64,
        Dtype::I32 => i32::from_le_bytes(b.try_into().ok()?) as f64,
        Dtype::I16 => i16::from_le_bytes(b.try_into().ok()?) as f64,
        Dtype::I8 => b[0] as i8 as f64,
        Dtype::U64 => u64::from_le_bytes(b.try_into().ok()?) as f64,
        Dtype::U32 => u32::from_le_bytes(b.try_into().ok()?) as f64,
        Dtype::U16 => u16::from_le_bytes(b.try_into().ok()?) as f64,
        Dtype::U8 | Dtype::Bool => b[0] as f64,
        _ => return None,
    })
}

/// The larger of two differences, NaN as soon as either is (`f64::max`
/// would drop a NaN found earlier).
fn larger(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() { f64::NAN } else { a.max(b) }
}

/// (differing elements, element count, max abs difference where defined).
fn content_difference(dtype: Dtype, a: &[u8], b: &[u8]) -> (usize, usize, Option<f64>) {
    if dtype.bits() < 8 {
        // Packed elements (F4: two a byte; F6: four in three bytes), compared
        // as fields of `bits` bits, lowest bits first.
        let bits = dtype.bits();
        let n = a.len() * 8 / bits;
        let bit = |i: usize| (a[i / 8] ^ b[i / 8]) >> (i % 8) & 1 != 0;
        let differing = (0..n).filter(|e| (e * bits..(e + 1) * bits).any(bit)).count();
        return (differing, n, None);
    }
    if dtype == Dtype::C64 {
        let n = a.len() / 8;
        let mut max = 0f64;
        let mut differing = 0;
        for i in 0..n {
            let part = |d: &[u8], k: usize| f32::from_le_bytes(d[k..k + 4].try_into().expect("4 bytes")) as f64;
            let (re, im) = (part(a, i * 8) - part(b, i * 8), part(a, i * 8 + 4) - part(b, i * 8 + 4));
            if a[i * 8..i * 8 + 8] != b[i * 8..i * 8 + 8] {
                differing += 1;
                max = larger(max, re.hypot(im));
            }
        }
        return (differing, n, Some(max));
    }
    let width = dtype.bits().max(8) / 8;
    let n = a.len() / width;
    let decodable = element(dtype, a, 0).is_some() || n == 0;
    let mut max = 0f64;
    let mut differing = 0;
    for i in 0..n {
        if a[i * width..(i + 1) * width] == b[i * width..(i + 1) * width] {
            continue;
        }
        differing += 1;
        if let (Some(x), Some(y)) = (element(dtype, a, i), element(dtype, b, i)) {
            let d = (x - y).abs();
            max = larger(max, d);
        }
    }
    (differing, n, decodable.then_some(max))
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
        assert_eq!(content_difference(Dtype::F32, &a, &b), (2, 3, Some(2.0)));
        assert_eq!(content_difference(Dtype::F8E4M3, &[1, 2], &[1, 3]), (1, 2, None));
        // A NaN stays the answer whatever comes after it.
        let nan_first: Vec<u8> = [f32::NAN, 2.0, 5.0].iter().flat_map(|f| f.to_le_bytes()).collect();
        let (differing, n, max) = content_difference(Dtype::F32, &a, &nan_first);
        assert!((differing, n) == (2, 3) && max.unwrap().is_nan());
        // F4 packs two elements a byte: elements are counted, not bytes.
        assert_eq!(content_difference(Dtype::F4, &[0x12, 0x34], &[0x13, 0x34]), (1, 4, None));
        assert_eq!(content_difference(Dtype::F4, &[0x12], &[0x21]), (2, 2, None));
        assert_eq!(content_difference(Dtype::F6E2M3, &[0, 0, 0x80], &[0, 0, 0]), (1, 4, None));
    }
}
