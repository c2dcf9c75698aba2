//! The `tensafe` command line.

/// `println!` for a line that carries text from the files being examined
/// (tensor names, pickle globals, archive entries): control characters come
/// out escaped, so a hostile file can neither drive the terminal nor forge
/// lines of the report. Names quoted in it were escaped already
/// ([`tensafe::Printable`]); the line's pass ([`tensafe::PrintableLine`])
/// leaves their backslashes alone, so they are not escaped twice.
macro_rules! say {
    ($($arg:tt)*) => { crate::emit(format_args!("{}\n", tensafe::PrintableLine(&format!($($arg)*)))) };
}

/// `print!` of text that is already safe to show (JSON, whose strings are
/// escaped; tables built with [`tensafe::Printable`]), through [`emit`].
macro_rules! out {
    ($($arg:tt)*) => { crate::emit(format_args!($($arg)*)) };
}

/// [`say!`] for standard error.
/// Prints an error, escaped; nothing once a signal is ending the program
/// (its cleanup is what made the work fail).
macro_rules! say_err {
    ($($arg:tt)*) => {
        if !crate::STOPPING.load(std::sync::atomic::Ordering::SeqCst) {
            eprintln!("{}", tensafe::PrintableLine(&format!($($arg)*)))
        }
    };
}

mod convert;
mod diff;
mod inspect;
mod remote;
mod scan;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use tensafe::{Dtype, PreadFile};

pub(crate) use inspect::human_bytes;

#[derive(Parser)]
#[command(name = "tensafe", version, about = "Inspect, verify and diff safetensors files; scan and convert pickle checkpoints without running them")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the tensors of a file or sharded checkpoint (reads headers only).
    Inspect {
        /// A .safetensors file, a checkpoint directory or its index (.json);
        /// or their URL (s3://, gs://, az://, http(s)://; a directory URL ends in /).
        path: PathBuf,
        /// Print JSON for scripts instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Validate files completely and read every byte; exit code 1 on any problem.
    Verify {
        /// The .safetensors files or checkpoints (a folder or index: every
        /// shard, after checking the index), paths or s3://, gs://, az://,
        /// http(s):// URLs (a URL ending in `/` or `.json` is a checkpoint).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Convert a pickle (PyTorch) checkpoint to safetensors without executing
    /// it. Exit code 1 when the input is refused.
    Convert(convert::ConvertArgs),
    /// Report every import and call a pickle file would make if loaded.
    /// Exit codes: 0 only allowlisted content, 1 suspicious or dangerous
    /// content found, 2 a file could not be scanned completely (malformed),
    /// 3 a file is in a container the scanner does not open (compressed).
    Scan(scan::ScanArgs),
    /// Rewrite a checkpoint (file, directory or index) into shards of at most
    /// the given size, with a transformers-style index. Locally nothing is
    /// replaced before every shard is written (in place works); then shards
    /// and the `model.safetensors` or index of an earlier checkpoint in the
    /// output directory are removed, as transformers does.
    Reshard {
        /// The input checkpoint: a file, directory or index, or its URL
        /// (s3://, gs://, az://, http(s)://; a directory URL ends in /).
        input: PathBuf,
        /// The output directory, or a URL prefix to upload to (s3://, gs://, az://).
        output: PathBuf,
        /// Largest shard, e.g. `5GB`, `500MiB` or a byte count.
        #[arg(long, default_value = "5GB")]
        max_shard_size: String,
    },
    /// Compare the tensors of two files (safetensors or torch checkpoints).
    /// Exit codes: 0 identical tensors, 1 differences, 2 unreadable input.
    Diff(diff::DiffArgs),
}

/// Writes to standard output. A full disk or any other failure to write is
/// reported and ends the program with status 74 (`EX_IOERR`) rather than a
/// panic; a closed pipe ends it as it ends other Unix tools (see `main`).
pub(crate) fn emit(text: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(text).and_then(|()| stdout.flush()) {
        // Not eprintln!, which would panic if standard error failed too.
        let _ = writeln!(std::io::stderr(), "tensafe: cannot write the output: {e}");
        std::process::exit(74);
    }
}

/// Writes `value` to standard output as pretty JSON, what a name from a
/// file could do to a terminal escaped ([`tensafe::PrintableJson`]).
pub(crate) fn emit_json(value: &impl serde::Serialize) {
    let text = serde_json::to_string_pretty(value).expect("reports and JSON values serialize");
    emit(format_args!("{}\n", tensafe::PrintableJson(&text)));
}

/// Set when a signal's cleanup begins: the main thread then waits for it.
static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Ends the program on Ctrl-C, `kill` or a closed terminal as the default
/// action would (by that signal), after removing the temporary files of
/// writes that have not finished and aborting unfinished multipart uploads
/// (at most 10 s): a stopped `convert` or `reshard` leaves a local
/// destination as it was (or all new, if it was renaming) and no temporary
/// file or unfinished upload behind.
#[cfg(unix)]
fn remove_unfinished_files_on_signals() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        Ok(signals) => signals,
        Err(e) => {
            say_err!("tensafe: cannot watch for Ctrl-C ({e}); a stopped write may leave a temporary file");
            return;
        }
    };
    std::thread::spawn(move || {
        let mut signals = signals.forever();
        if let Some(signal) = signals.next() {
            STOPPING.store(true, std::sync::atomic::Ordering::SeqCst);
            std::thread::spawn(move || {
                // Whatever happens in the cleanup, the signal ends the program.
                let _ = std::panic::catch_unwind(|| {
                    tensafe::remove_unfinished_files();
                    tensafe_remote::abort_unfinished_uploads(std::time::Duration::from_secs(10));
                });
                die_of(signal);
            });
            // A second Ctrl-C does not wait for the aborts (other signals,
            // which a shell or supervisor may send again, do).
            if signals.any(|again| again == SIGINT) {
                die_of(SIGINT);
            }
        }
    });
}

/// Ends the process as `signal`'s default action would: dying of the signal
/// itself tells a shell to stop a loop too.
#[cfg(unix)]
fn die_of(signal: i32) -> ! {
    let _ = signal_hook::low_level::emulate_default_handler(signal);
    std::process::exit(128 + signal)
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so writing into a closed pipe (`tensafe inspect
    // big | head`) would be an error at every write; with the default action
    // the program ends quietly there, as `cat` or `grep` do.
    #[cfg(unix)]
    // SAFETY: resetting a signal's disposition before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    #[cfg(unix)]
    remove_unfinished_files_on_signals();
    let code = run(Cli::parse());
    // A signal's cleanup makes the writes fail; the signal, not their
    // errors, ends the program.
    while STOPPING.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::park();
    }
    code
}

fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Inspect { path, json } => match remote::url(&path) {
            Some(url) => remote::inspect(url, json),
            None => inspect::run(&path, json),
        },
        Command::Verify { files } => {
            let mut ok = true;
            for file in &files {
                let result = match remote::url(file) {
                    Some(url) => remote::verify(url),
                    None => verify(file),
                };
                match result {
                    Ok(report) => say!("OK    {report}"),
                    Err(e) => {
                        say!("FAIL  {e}");
                        ok = false;
                    }
                }
            }
            if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Command::Convert(args) => convert::run(&args),
        Command::Scan(args) => scan::run(&args),
        Command::Diff(args) => diff::run(&args),
        Command::Reshard { input, output, max_shard_size } => reshard(&input, &output, &max_shard_size),
    }
}

/// `tensafe reshard IN OUT`: either side may be a URL (s3://, gs://, az://;
/// the input also http(s)://).
fn reshard(input: &Path, output: &Path, max_shard_size: &str) -> ExitCode {
    let result = match (remote::url(input), remote::url(output)) {
        (None, None) => tensafe::parse_size(max_shard_size).and_then(|max| tensafe::reshard(input, output, max)).map_err(|e| e.to_string()),
        (input_url, output_url) => {
            let (input, output) = (input_url.map_or_else(|| input.display().to_string(), str::to_owned), output_url.map_or_else(|| output.display().to_string(), str::to_owned));
            tensafe::parse_size(max_shard_size)
                .map_err(|e| e.to_string())
                .and_then(|max| {
                    remote::with_transfer_progress("reshard", || {
                        tensafe_remote::reshard(&input, &output, max, &tensafe_remote::RemoteOptions::default()).map_err(|e| e.to_string())
                    })
                })
        }
    };
    let inside = |name: &str| format!("{}/{name}", output.display().to_string().trim_end_matches('/'));
    match result {
        Ok(Some(index)) => {
            let shards: std::collections::BTreeSet<&String> = index.weight_map.values().collect();
            say!("wrote {} and {} to {}", count(shards.len(), "shard"), tensafe::INDEX_FILE, output.display());
            ExitCode::SUCCESS
        }
        Ok(None) => {
            say!("wrote {}", inside(tensafe::SINGLE_FILE));
            ExitCode::SUCCESS
        }
        Err(e) => {
            say_err!("tensafe: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `n` and a noun, plural unless `n` is 1: "1 tensor", "3 tensors".
pub(crate) fn count(n: usize, noun: &str) -> String {
    format!("{n} {}", plural(n as u128, noun))
}

/// The noun as it follows the number `n`.
pub(crate) fn plural(n: u128, noun: &str) -> String {
    if n == 1 { noun.to_string() } else { format!("{noun}s") }
}

/// Full validation plus a read of every data byte; BOOL tensors must hold 0 or 1.
fn verify(path: &Path) -> Result<String, String> {
    let start = Instant::now();
    // A folder or index: the index and shards agree, then every shard.
    let checkpoint = tensafe::ShardedCheckpoint::open(path).map_err(|e| e.to_string())?;
    let (tensors, bytes) = verify_each(&checkpoint, verify_file)?;
    Ok(verified(&path.display().to_string(), &checkpoint, tensors, bytes, start, None))
}

/// Verifies every shard of `checkpoint` with `verify`: (tensors, bytes) in all.
pub(crate) fn verify_each<F: tensafe::ShardFile>(checkpoint: &tensafe::Checkpoint<F>, verify: impl Fn(&F) -> Result<(usize, u64), String>) -> Result<(usize, u64), String> {
    checkpoint.shards().iter().try_fold((0, 0), |(tensors, bytes), shard| verify(shard).map(|(t, b)| (tensors + t, bytes + b)))
}

/// The `verify` line of a file or checkpoint.
pub(crate) fn verified<F: tensafe::ShardFile>(what: &str, checkpoint: &tensafe::Checkpoint<F>, tensors: usize, bytes: u64, start: Instant, requests: Option<u64>) -> String {
    let seconds = start.elapsed().as_secs_f64();
    let shards = checkpoint.index().map(|_| format!("{}, ", count(checkpoint.shards().len(), "shard"))).unwrap_or_default();
    let requests = requests.map(|n| format!(", {}", count(n as usize, "request"))).unwrap_or_default();
    format!("{what}: {shards}{}, {bytes} bytes read in {seconds:.3} s ({:.2} GB/s{requests})", count(tensors, "tensor"), bytes as f64 / seconds.max(1e-9) / 1e9)
}

/// Reads every data byte of one file: (tensors, bytes of the file).
fn verify_file(file: &PreadFile) -> Result<(usize, u64), String> {
    let header = file.header();
    const CHUNK: usize = 8 << 20;
    let mut buf = vec![0u8; CHUNK.min(header.data_len().max(1))];
    for (name, info) in header.iter() {
        let (begin, end) = info.data_offsets;
        let mut at = begin;
        while at < end {
            let len = CHUNK.min(end - at);
            file.read_data_at(at as u64, &mut buf[..len]).map_err(|e| e.in_file(file.path()).to_string())?;
            if info.dtype == Dtype::Bool {
                check_bools(&file.path().display().to_string(), name, &buf[..len], (at - begin) as u64, header.data_start() + at as u64)?;
            }
            at += len;
        }
    }
    Ok((header.len(), header.data_start() + header.data_len() as u64))
}

/// Fails on the first byte of a BOOL tensor's `chunk` that is not 0 or 1;
/// `first_element` and `first_offset` locate the chunk in the tensor and file.
pub(crate) fn check_bools(source: &str, name: &str, chunk: &[u8], first_element: u64, first_offset: u64) -> Result<(), String> {
    match chunk.iter().position(|&b| b > 1) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{source}: BOOL tensor `{}` holds the byte {} at element {} (file offset {}); booleans must be 0 or 1",
            tensafe::Printable(name),
            chunk[i],
            first_element + i as u64,
            first_offset + i as u64
        )),
    }
}
