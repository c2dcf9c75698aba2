//! URLs for `inspect` and `verify`: files and checkpoints in object storage
//! (s3://, gs://, az://) or on web servers (http(s)://), read with range
//! requests through tensafe-remote. Credentials and endpoints come from the
//! usual environment variables (AWS_*, GOOGLE_*, AZURE_*).

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use tensafe::Dtype;
use tensafe_remote::{RemoteCheckpoint, RemoteError, RemoteFile, RemoteOptions, RemoteUrl};

use crate::inspect;

/// Runs `work`, which moves bytes through tensafe-remote (downloads,
/// uploads or both), with a progress line on stderr: bytes received plus
/// sent, rate and elapsed time. Drawn only when stderr is a terminal.
pub fn with_transfer_progress<T>(label: &str, work: impl FnOnce() -> T) -> T {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg}: {bytes} {binary_bytes_per_sec} {elapsed}").expect("valid template"),
    );
    bar.set_message(label.to_owned());
    let start = tensafe_remote::global_traffic();
    // Dropping `done` wakes the drawing thread at once: the command does not
    // wait out a redraw interval when the work ends.
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let out = std::thread::scope(|scope| {
        let bar = &bar;
        scope.spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(std::time::Duration::from_millis(100)) {
                let moved = tensafe_remote::global_traffic() - start;
                bar.set_position(moved.bytes + moved.sent);
            }
        });
        let out = work();
        drop(done);
        out
    });
    bar.finish_and_clear();
    out
}

/// The argument as a URL, when it is one.
pub fn url(arg: &Path) -> Option<&str> {
    arg.to_str().filter(|s| RemoteUrl::is_remote(s))
}

/// `tensafe inspect URL`: headers only (one or two range requests a file).
pub fn inspect(url: &str, as_json: bool) -> ExitCode {
    let checkpoint = match RemoteCheckpoint::open(url, &RemoteOptions::default()) {
        Ok(c) => c,
        Err(e) => {
            say_err!("tensafe: {e}");
            return ExitCode::FAILURE;
        }
    };
    let shards = checkpoint.shards().iter().map(|s| (s.url().object_path().filename().unwrap_or_default().to_owned(), s.header()));
    inspect::print_checkpoint(Path::new(url), checkpoint.index().is_some(), shards, as_json)
}

/// Bytes fetched per step of `verify` (with concurrent requests inside it).
const WINDOW: usize = 256 << 20;

/// Transfers shorter than this get no progress bar.
const LONG_TRANSFER: u64 = 64 << 20;

struct Failure(String);

impl From<RemoteError> for Failure {
    fn from(e: RemoteError) -> Failure {
        Failure(e.to_string())
    }
}

/// `tensafe verify URL`: the header, then every data byte streamed through a
/// bounded buffer (BOOL tensors must hold 0 or 1), with a progress bar on
/// long transfers when stderr is a terminal. A URL ending in `/` or `.json`
/// is a checkpoint: its index and shards are checked for agreement, then
/// every shard so.
pub fn verify(url: &str) -> Result<String, String> {
    let start = Instant::now();
    let checkpoint = RemoteCheckpoint::open(url, &RemoteOptions::default()).map_err(|e| e.to_string())?;
    let (tensors, bytes) = crate::verify_each(&checkpoint, verify_file)?;
    // Every request: the index (or the probe for one), headers and data.
    let requests = checkpoint.traffic().requests;
    Ok(crate::verified(url, &checkpoint, tensors, bytes, start, Some(requests)))
}

/// Reads every data byte of one remote file: (tensors, bytes).
fn verify_file(file: &RemoteFile) -> Result<(usize, u64), String> {
    let url = file.url().as_str();
    let header = file.header();
    let data_len = header.data_len() as u64;
    let bar = if data_len >= LONG_TRANSFER { indicatif::ProgressBar::new(data_len) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(file.url().object_path().filename().unwrap_or_default().to_owned());
    let bools: Vec<_> = header.iter().filter(|(_, info)| info.dtype == Dtype::Bool).collect();
    let result = file.stream_data(WINDOW, Some(&|n| bar.set_position(n)), |offset, bytes| {
        let end = offset + bytes.len() as u64;
        for (name, info) in &bools {
            let (begin, stop) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
            let (lo, hi) = (begin.max(offset), stop.min(end));
            if lo >= hi {
                continue;
            }
            let chunk = &bytes[(lo - offset) as usize..(hi - offset) as usize];
            crate::check_bools(url, name, chunk, lo - begin, header.data_start() + lo).map_err(Failure)?;
        }
        Ok(())
    });
    bar.finish_and_clear();
    result.map_err(|Failure(e)| e)?;
    Ok((header.len(), file.size()))
}
