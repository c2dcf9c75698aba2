//! The `tensafe` command line.

mod convert;
mod diff;
mod scan;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use serde_json::json;
use tensafe::{Dtype, Header, PreadFile};

#[derive(Parser)]
#[command(name = "tensafe", version, about = "Inspect, verify and diff safetensors files; scan and convert pickle checkpoints without running them")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the tensors of a file (reads the header only).
    Inspect {
        /// The .safetensors file.
        file: PathBuf,
        /// Print JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Validate files completely and read every byte; exit code 1 on any problem.
    Verify {
        /// The .safetensors files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Convert a pickle (PyTorch) checkpoint to safetensors without executing
    /// it. Exit code 1 when the input is refused.
    Convert(convert::ConvertArgs),
    /// Report every import and call a pickle file would make if loaded.
    /// Exit codes: 0 only allowlisted content, 1 suspicious or dangerous
    /// content found, 2 a file could not be scanned completely.
    Scan(scan::ScanArgs),
    /// Compare the tensors of two files (safetensors or torch checkpoints).
    /// Exit codes: 0 identical tensors, 1 differences, 2 unreadable input.
    Diff(diff::DiffArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Inspect { file, json } => match PreadFile::open(&file) {
            Ok(f) => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&inspect_json(f.header())).expect("JSON values serialize"));
                } else {
                    print!("{}", inspect_table(&file, f.header()));
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tensafe: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Verify { files } => {
            let mut ok = true;
            for file in &files {
                match verify(file) {
                    Ok(report) => println!("OK    {report}"),
                    Err(e) => {
                        println!("FAIL  {e}");
                        ok = false;
                    }
                }
            }
            if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Command::Convert(args) => convert::run(&args),
        Command::Scan(args) => scan::run(&args),
        Command::Diff(args) => diff::run(&args),
    }
}

/// Totals for one dtype.
#[derive(Default)]
struct Totals {
    tensors: usize,
    parameters: u128,
    bytes: u128,
}

fn totals_by_dtype(header: &Header) -> BTreeMap<Dtype, Totals> {
    let mut totals: BTreeMap<Dtype, Totals> = BTreeMap::new();
    for (_, info) in header.iter() {
        let t = totals.entry(info.dtype).or_default();
        t.tensors += 1;
        t.parameters += info.num_elements() as u128;
        t.bytes += info.byte_len() as u128;
    }
    totals
}

fn inspect_json(header: &Header) -> serde_json::Value {
    let tensors: Vec<_> = header
        .iter()
        .map(|(name, info)| {
            json!({
                "name": name,
                "dtype": info.dtype.code(),
                "shape": info.shape,
                "data_offsets": [info.data_offsets.0, info.data_offsets.1],
                "file_offset": header.data_start() + info.data_offsets.0 as u64,
                "bytes": info.byte_len(),
            })
        })
        .collect();
    let by_dtype: serde_json::Map<String, serde_json::Value> = totals_by_dtype(header)
        .iter()
        .map(|(dtype, t)| (dtype.code().to_string(), json!({"tensors": t.tensors, "parameters": t.parameters as u64, "bytes": t.bytes as u64})))
        .collect();
    let metadata = header.metadata().map(|m| m.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>());
    json!({
        "header_bytes": header.header_len_bytes(),
        "data_bytes": header.data_len(),
        "metadata": metadata,
        "tensors": tensors,
        "totals": {
            "tensors": header.len(),
            "parameters": by_dtype.values().map(|v| v["parameters"].as_u64().unwrap_or(0)).sum::<u64>(),
            "bytes": header.data_len(),
            "by_dtype": by_dtype,
        },
    })
}

fn inspect_table(path: &Path, header: &Header) -> String {
    use std::fmt::Write;
    let totals = totals_by_dtype(header);
    let parameters: u128 = totals.values().map(|t| t.parameters).sum();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: {} tensors, {} parameters, {} of data, {}-byte header",
        path.display(),
        header.len(),
        group_digits(parameters),
        human_bytes(header.data_len() as u128),
        header.header_len_bytes()
    );
    if let Some(metadata) = header.metadata() {
        for (key, value) in metadata {
            let _ = writeln!(out, "  metadata {key} = {value:?}");
        }
    }
    if header.is_empty() {
        return out;
    }
    let rows: Vec<[String; 5]> = header
        .iter()
        .map(|(name, info)| {
            [
                name.to_string(),
                info.dtype.code().to_string(),
                format!("{:?}", info.shape),
                info.byte_len().to_string(),
                (header.data_start() + info.data_offsets.0 as u64).to_string(),
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(&["name", "dtype", "shape", "bytes", "offset"], &rows, &[false, false, false, true, true]));
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
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

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

/// Full validation plus a read of every data byte; BOOL tensors must hold 0 or 1.
fn verify(path: &Path) -> Result<String, String> {
    let start = Instant::now();
    let file = PreadFile::open(path).map_err(|e| e.to_string())?;
    let header = file.header();
    const CHUNK: usize = 8 << 20;
    let mut buf = vec![0u8; CHUNK.min(header.data_len().max(1))];
    for (name, info) in header.iter() {
        let (begin, end) = info.data_offsets;
        let mut at = begin;
        while at < end {
            let len = CHUNK.min(end - at);
            file.read_data_at(at as u64, &mut buf[..len]).map_err(|e| e.to_string())?;
            if info.dtype == Dtype::Bool
                && let Some(i) = buf[..len].iter().position(|&b| b > 1)
            {
                return Err(format!(
                    "{}: BOOL tensor `{name}` holds the byte {} at element {} (file offset {}); booleans must be 0 or 1",
                    path.display(),
                    buf[i],
                    at - begin + i,
                    header.data_start() + (at + i) as u64
                ));
            }
            at += len;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let total = header.data_start() + header.data_len() as u64;
    Ok(format!(
        "{}: {} tensors, {} bytes read in {:.3} s ({:.2} GB/s)",
        path.display(),
        header.len(),
        total,
        seconds,
        total as f64 / seconds.max(1e-9) / 1e9
    ))
}
