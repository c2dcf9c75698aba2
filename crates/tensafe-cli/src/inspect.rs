//! `tensafe inspect`: the tensors of a file or of a sharded checkpoint, as a
//! table or as JSON. Reads headers only.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use serde_json::json;
use tensafe::{Dtype, Header, ShardedCheckpoint};

/// One file of what is inspected: its name (for checkpoints) and header.
struct Part<'a> {
    shard: Option<String>,
    header: &'a Header,
}

pub fn run(path: &Path, as_json: bool) -> ExitCode {
    let checkpoint = match ShardedCheckpoint::open(path) {
        Ok(c) => c,
        Err(e) => {
            say_err!("tensafe: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shards = checkpoint.shards().iter().map(|s| (s.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), s.header()));
    print_checkpoint(path, checkpoint.index().is_some(), shards, as_json)
}

/// Prints a checkpoint given as (shard file name, header) pairs; the names
/// are shown only for a sharded one (local or remote).
pub(crate) fn print_checkpoint<'a>(path: &Path, sharded: bool, shards: impl Iterator<Item = (String, &'a Header)>, as_json: bool) -> ExitCode {
    let parts: Vec<Part<'_>> = shards.map(|(name, header)| Part { shard: sharded.then_some(name), header }).collect();
    print(path, &parts, as_json)
}

/// Prints what `inspect` shows of `parts`.
fn print(path: &Path, parts: &[Part<'_>], as_json: bool) -> ExitCode {
    if as_json {
        crate::emit_json(&to_json(parts));
    } else {
        out!("{}", to_table(path, parts));
    }
    ExitCode::SUCCESS
}

/// Totals for one dtype.
#[derive(Default)]
struct Totals {
    tensors: usize,
    parameters: u128,
    bytes: u128,
}

fn totals_by_dtype(parts: &[Part<'_>]) -> BTreeMap<Dtype, Totals> {
    let mut totals: BTreeMap<Dtype, Totals> = BTreeMap::new();
    for (_, info) in parts.iter().flat_map(|p| p.header.iter()) {
        let t = totals.entry(info.dtype).or_default();
        t.tensors += 1;
        t.parameters += info.num_elements() as u128;
        t.bytes += info.byte_len() as u128;
    }
    totals
}

/// One tensor of `inspect --json`, borrowed from its header (a header of a
/// million tensors would take gigabytes as `serde_json::Value`s).
#[derive(serde::Serialize)]
struct TensorEntry<'a> {
    name: &'a str,
    dtype: &'static str,
    shape: &'a [usize],
    data_offsets: [usize; 2],
    file_offset: u64,
    bytes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    shard: Option<&'a str>,
}

/// What `inspect --json` prints.
#[derive(serde::Serialize)]
struct Listing<'a> {
    header_bytes: u64,
    data_bytes: u64,
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
    tensors: Vec<TensorEntry<'a>>,
    totals: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    shards: Option<Vec<Option<&'a str>>>,
}

fn to_json<'a>(parts: &'a [Part<'a>]) -> Listing<'a> {
    let tensors: Vec<_> = parts
        .iter()
        .flat_map(|part| {
            part.header.iter().map(move |(name, info)| TensorEntry {
                name,
                dtype: info.dtype.code(),
                shape: &info.shape,
                data_offsets: [info.data_offsets.0, info.data_offsets.1],
                file_offset: part.header.data_start() + info.data_offsets.0 as u64,
                bytes: info.byte_len(),
                shard: part.shard.as_deref(),
            })
        })
        .collect();
    let by_dtype: serde_json::Map<String, serde_json::Value> = totals_by_dtype(parts)
        .iter()
        .map(|(dtype, t)| (dtype.code().to_string(), json!({"tensors": t.tensors, "parameters": t.parameters as u64, "bytes": t.bytes as u64})))
        .collect();
    let first = parts.first().map(|p| p.header);
    let metadata = first
        .and_then(Header::metadata)
        .map(|m| m.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>());
    let data_bytes: u64 = parts.iter().map(|p| p.header.data_len() as u64).sum();
    let totals = json!({
        "tensors": tensors.len(),
        "parameters": by_dtype.values().map(|v| v["parameters"].as_u64().unwrap_or(0)).sum::<u64>(),
        "bytes": data_bytes,
        "by_dtype": by_dtype,
    });
    Listing {
        header_bytes: parts.iter().map(|p| p.header.header_len_bytes() as u64).sum::<u64>(),
        data_bytes,
        metadata,
        tensors,
        totals,
        shards: parts.iter().any(|p| p.shard.is_some()).then(|| parts.iter().map(|p| p.shard.as_deref()).collect()),
    }
}

fn to_table(path: &Path, parts: &[Part<'_>]) -> String {
    use std::fmt::Write;
    let totals = totals_by_dtype(parts);
    let parameters: u128 = totals.values().map(|t| t.parameters).sum();
    let tensors: usize = parts.iter().map(|p| p.header.len()).sum();
    let data: u128 = parts.iter().map(|p| p.header.data_len() as u128).sum();
    let header_bytes: usize = parts.iter().map(|p| p.header.header_len_bytes()).sum();
    let sharded = parts.iter().any(|p| p.shard.is_some());
    let mut out = String::new();
    let shards = if sharded { format!(" in {}", crate::count(parts.len(), "shard")) } else { String::new() };
    let _ = writeln!(
        out,
        "{}: {}{shards}, {} {}, {} of data, {header_bytes}-byte header{}",
        tensafe::Printable(&path.display().to_string()),
        crate::count(tensors, "tensor"),
        group_digits(parameters),
        crate::plural(parameters, "parameter"),
        human_bytes(data),
        if sharded { "s" } else { "" },
    );
    if let Some(metadata) = parts.first().and_then(|p| p.header.metadata()) {
        for (key, value) in metadata {
            let _ = writeln!(out, "  metadata {} = {value:?}", tensafe::Printable(key));
        }
    }
    if tensors == 0 {
        return out;
    }
    let rows: Vec<[String; 6]> = parts
        .iter()
        .flat_map(|part| {
            part.header.iter().map(move |(name, info)| {
                [
                    tensafe::Printable(name).to_string(),
                    info.dtype.code().to_string(),
                    format!("{:?}", info.shape),
                    info.byte_len().to_string(),
                    (part.header.data_start() + info.data_offsets.0 as u64).to_string(),
                    part.shard.as_deref().map(|s| tensafe::Printable(s).to_string()).unwrap_or_default(),
                ]
            })
        })
        .collect();
    out.push('\n');
    if sharded {
        out.push_str(&table(&["name", "dtype", "shape", "bytes", "offset", "shard"], &rows, &[false, false, false, true, true, false]));
    } else {
        let rows: Vec<[String; 5]> = rows.into_iter().map(|[a, b, c, d, e, _]| [a, b, c, d, e]).collect();
        out.push_str(&table(&["name", "dtype", "shape", "bytes", "offset"], &rows, &[false, false, false, true, true]));
    }
    let dtype_rows: Vec<[String; 4]> = totals
        .iter()
        .map(|(dtype, t)| [dtype.code().to_string(), t.tensors.to_string(), group_digits(t.parameters), human_bytes(t.bytes)])
        .collect();
    out.push('\n');
    out.push_str(&table(&["dtype", "tensors", "parameters", "bytes"], &dtype_rows, &[false, true, true, true]));
    out
}

/// Left- or right-aligned columns separated by two spaces.
fn table<const N: usize>(titles: &[&str; N], rows: &[[String; N]], right: &[bool; N]) -> String {
    let mut widths = titles.map(|t| t.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut s = String::new();
        for (k, cell) in cells.iter().enumerate() {
            let pad = widths[k] - cell.chars().count();
            if k > 0 {
                s.push_str("  ");
            }
            if right[k] {
                s.push_str(&" ".repeat(pad));
                s.push_str(cell);
            } else {
                s.push_str(cell);
                if k + 1 < N {
                    s.push_str(&" ".repeat(pad));
                }
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(titles.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn group_digits(n: u128) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `1.5 GiB`-style sizes.
pub(crate) fn human_bytes(n: u128) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}
