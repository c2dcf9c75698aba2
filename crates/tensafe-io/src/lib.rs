//! The tensafe I/O engine: executes a plan of byte ranges (file → destination
//! buffer) with a bounded pool of threads doing positional reads.
//!
//! * Adjacent ranges are coalesced into large reads, then split into chunks of
//!   at most [`EngineOptions::chunk_bytes`].
//! * At most [`EngineOptions::threads`] reads are in flight, each straight into
//!   its final place in the destination: no staging copy, and bytes in flight
//!   never exceed `threads × chunk_bytes`.
//! * Cold reads can bypass the page cache ([`DirectIo`], `O_DIRECT` on Linux):
//!   the disk then writes straight into the destination, without a copy out of
//!   the cache and without filling the cache with a second copy of the model.
//! * [`evict`] drops a file's pages from the page cache after a load, so a
//!   model is not held twice in RAM (once in the cache, once in the tensors).
//! * [`gather::read_runs_into`] reads many small runs (slices' rows or
//!   columns), those close together in the file as one span each.
//! * [`prefetch::Prefetch`] reads a mapped file into the page cache on a
//!   background thread, ahead of the thread that faults it in.
//! * [`staging::stage`] runs staged loads: reads into a bounded set of slots,
//!   each copied out (to a device) before it is reused.

pub mod gather;
pub mod prefetch;
mod progress;
pub mod staging;

pub use progress::Progress;

use std::fs::File;
use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;

/// One range to read: `len` bytes at `file_offset` go to `dst_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadRange {
    /// Offset in the file.
    pub file_offset: u64,
    /// Offset in the destination buffer.
    pub dst_offset: usize,
    /// Number of bytes.
    pub len: usize,
}

/// Whether reads bypass the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirectIo {
    /// Always through the page cache.
    Never,
    /// Bypass the cache when most of the file's pages are not in it (a cold
    /// load); read through it when they are (copying from the cache is
    /// faster than the disk).
    #[default]
    Auto,
    /// Bypass the cache wherever the filesystem allows it.
    Always,
}

/// Bounds of the engine.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Reader threads (at least 1).
    pub threads: usize,
    /// Largest single read, in bytes.
    pub chunk_bytes: usize,
    /// Page-cache bypass. Only the parts of a range that are aligned to
    /// [`DIRECT_ALIGN`] in the file and in the destination are read directly;
    /// the rest, and filesystems without `O_DIRECT` (tmpfs), go through the cache.
    pub direct: DirectIo,
}

impl Default for EngineOptions {
    /// Measured on the 2-core development machines with `bench/load_bench.py`:
    /// 4 threads and 8 MiB reads reach the disk's bandwidth cold and the
    /// memory bandwidth warm, and a cold 1 GiB read took 0.55 s direct against
    /// 0.98 s through the page cache ("tensafe engine" rows). More threads
    /// help on machines with more cores and NVMe queues; the Python API
    /// exposes the knobs.
    fn default() -> Self {
        EngineOptions { threads: 4, chunk_bytes: 8 << 20, direct: DirectIo::Auto }
    }
}

/// Alignment of direct reads: file offset, length and destination address.
/// 4096 covers every logical block size in common use.
pub const DIRECT_ALIGN: usize = 4096;

/// Sorts ranges by file offset and merges those contiguous in both the file
/// and the destination.
pub fn coalesce(mut ranges: Vec<ReadRange>) -> Vec<ReadRange> {
    ranges.retain(|r| r.len > 0);
    ranges.sort_by_key(|r| r.file_offset);
    let mut out: Vec<ReadRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last)
                if last.file_offset + last.len as u64 == r.file_offset && last.dst_offset + last.len == r.dst_offset =>
            {
                last.len += r.len
            }
            _ => out.push(r),
        }
    }
    out
}

/// Statistics of one execution.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes delivered to the destination (read, less the gaps of spans).
    pub bytes: u64,
    /// Pieces read (a direct piece may take up to three calls: its unaligned
    /// head and tail through the cache).
    pub reads: u64,
    /// Largest number of bytes being read at one moment.
    pub peak_in_flight: u64,
    /// Bytes read past the page cache.
    pub direct_bytes: u64,
}

/// One read of the plan.
struct Job<'a> {
    file_offset: u64,
    into: Destination<'a>,
}

/// Where the bytes of one read go.
enum Destination<'a> {
    /// Straight into place.
    Place(&'a mut [u8]),
    /// A span of `len` bytes read into the reader's scratch buffer, out of
    /// which each run (its offset in the span, its place) is copied.
    Scatter { len: usize, runs: Vec<(usize, &'a mut [u8])> },
}

impl Job<'_> {
    /// Bytes read from the file.
    fn read_len(&self) -> usize {
        match &self.into {
            Destination::Place(piece) => piece.len(),
            Destination::Scatter { len, .. } => *len,
        }
    }
}

/// Reads every range into `dst` with a pool of threads.
///
/// Ranges must lie inside `dst` and must not overlap there (checked: an error,
/// not a panic). `progress` runs on the calling thread: it hears the running
/// total of bytes read, in order, and a [`Progress::Tick`] every 50 ms. An
/// error from it, or from a read, stops the readers (each finishes the read
/// it is doing) and is returned, the first one.
pub fn read_into(
    file: &File,
    ranges: &[ReadRange],
    dst: &mut [u8],
    options: &EngineOptions,
    progress: impl FnMut(Progress) -> io::Result<()>,
) -> io::Result<Stats> {
    gather::read_grouped(file, ranges, None, dst, options, progress)
}

/// The largest read: `options.chunk_bytes` rounded down to whole pages.
fn chunk_size(options: &EngineOptions) -> usize {
    options.chunk_bytes.max(DIRECT_ALIGN) / DIRECT_ALIGN * DIRECT_ALIGN
}

/// The handle for direct reads, if `policy` wants them for a plan of
/// `bytes` bytes starting at file offset `first` and the file allows them.
fn direct_handle(file: &File, policy: DirectIo, first: Option<u64>, bytes: usize) -> Option<File> {
    let wanted = match policy {
        DirectIo::Never => false,
        DirectIo::Always => true,
        DirectIo::Auto => first.is_some_and(|offset| prefers_direct(file, offset, bytes)),
    };
    if wanted { open_direct(file) } else { None }
}

/// The places (destination offset, length, file offset) of `ranges` cut
/// into reads of at most `chunk` bytes (at aligned file offsets when
/// reading directly, so that every chunk but a range's first and last can
/// bypass the cache).
fn chunk_places(ranges: &[ReadRange], chunk: usize, aligned: bool) -> Vec<(usize, usize, u64)> {
    let mut places = Vec::new();
    for r in ranges {
        for (at, len) in cut(r.file_offset, r.len, chunk, aligned) {
            places.push((r.dst_offset + (at - r.file_offset) as usize, len, at));
        }
    }
    places
}

/// Carves `dst` into the disjoint pieces `places` ask for — (destination
/// offset, length, what the piece is for) — without unsafe code: sorted by
/// destination, each split off what is left. Overlapping places, and places
/// past the end of `dst`, are errors.
fn carve<T>(dst: &mut [u8], mut places: Vec<(usize, usize, T)>) -> io::Result<Vec<(T, &mut [u8])>> {
    places.sort_by_key(|(at, len, _)| (*at, *len));
    let mut pieces = Vec::with_capacity(places.len());
    let mut rest: &mut [u8] = dst;
    let mut consumed = 0usize;
    for (at, len, owner) in places {
        let skip = at.checked_sub(consumed).ok_or_else(|| invalid("ranges overlap in the destination"))?;
        if skip.checked_add(len).is_none_or(|end| end > rest.len()) {
            return Err(invalid("a range ends past the destination buffer"));
        }
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(skip);
        let (piece, tail) = tail.split_at_mut(len);
        pieces.push((owner, piece));
        rest = tail;
        consumed = at + len;
    }
    Ok(pieces)
}

/// Runs `jobs` on a pool of `options.threads` readers (see [`read_into`]);
/// reads go past the page cache through `direct_file` where aligned.
fn execute(
    file: &File,
    mut jobs: Vec<Job<'_>>,
    direct_file: Option<&File>,
    options: &EngineOptions,
    progress: impl FnMut(Progress) -> io::Result<()>,
) -> io::Result<Stats> {
    // Popping from the end starts the largest jobs first, and among equal
    // ones (the chunks of a large range, the spans of a slice) the first in
    // the file: reads then move forward, as the kernel's readahead expects.
    jobs.sort_by_key(|job| (job.read_len(), std::cmp::Reverse(job.file_offset)));
    let scratch_len = jobs.iter().filter(|job| matches!(job.into, Destination::Scatter { .. })).map(Job::read_len).max().unwrap_or(0);

    let job_count = jobs.len();
    let queue = Mutex::new(jobs);
    let in_flight = AtomicU64::new(0);
    let peak = AtomicU64::new(0);
    let direct_bytes = AtomicU64::new(0);
    let stopped = AtomicBool::new(false);
    let first_error: Mutex<Option<io::Error>> = Mutex::new(None);
    let stop = |e: io::Error| {
        first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
        stopped.store(true, Ordering::SeqCst);
    };
    let threads = options.threads.max(1).min(job_count.max(1));
    let (done_tx, done_rx) = mpsc::channel::<usize>();
    let relayed = std::thread::scope(|scope| {
        let readers = (0..threads).map(|_| {
            let done_tx = done_tx.clone();
            let (queue, stopped, stop) = (&queue, &stopped, &stop);
            let (in_flight, peak, direct_bytes) = (&in_flight, &peak, &direct_bytes);
            move || {
                // A span's bytes land here (allocated by the first span), at
                // their offset within a page in the file, as direct reads need.
                let mut scratch: Vec<u8> = Vec::new();
                loop {
                    if stopped.load(Ordering::SeqCst) {
                        return;
                    }
                    let Some(job) = queue.lock().expect("queue lock").pop() else { return };
                    let (offset, len) = (job.file_offset, job.read_len());
                    let read_into_place = |piece: &mut [u8]| match direct_file {
                        // Its unaligned head and tail go through the cache.
                        Some(direct_file) => read_exact_at_direct(file, direct_file, piece, offset).map(|went_direct| {
                            direct_bytes.fetch_add(went_direct as u64, Ordering::Relaxed);
                        }),
                        None => read_exact_at(file, piece, offset),
                    };
                    let delivered = match &job.into {
                        Destination::Place(piece) => piece.len(),
                        Destination::Scatter { runs, .. } => runs.iter().map(|(_, run)| run.len()).sum(),
                    };
                    let now = in_flight.fetch_add(len as u64, Ordering::SeqCst) + len as u64;
                    peak.fetch_max(now, Ordering::SeqCst);
                    let read = match job.into {
                        Destination::Place(piece) => read_into_place(piece),
                        Destination::Scatter { runs, .. } => {
                            if scratch.is_empty() {
                                scratch = vec![0; scratch_len + 2 * DIRECT_ALIGN];
                            }
                            let at = scratch.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN) + (offset % DIRECT_ALIGN as u64) as usize;
                            let span = &mut scratch[at..at + len];
                            read_into_place(span).map(|()| {
                                for (from, run) in runs {
                                    let n = run.len();
                                    run.copy_from_slice(&span[from..from + n]);
                                }
                            })
                        }
                    };
                    in_flight.fetch_sub(len as u64, Ordering::SeqCst);
                    if let Err(e) = read {
                        // The other readers stop before their next read.
                        stop(e);
                        return;
                    }
                    // The receiver is gone only once the load is over.
                    let _ = done_tx.send(delivered);
                }
            }
        });
        if let Err(e) = start_threads(scope, readers) {
            stop(e);
        }
        drop(done_tx);
        // Until every reader has ended (the scope then joins them, passing on a panic).
        progress::relay(done_rx, progress, || stopped.load(Ordering::SeqCst), &stop)
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(Stats {
        bytes: relayed.bytes as u64,
        reads: relayed.messages as u64,
        peak_in_flight: peak.into_inner(),
        direct_bytes: direct_bytes.into_inner(),
    })
}

/// Starts each of `workers` on a thread of `scope`, as many as the system
/// lets this process start: where one cannot be started (no memory left
/// for its stack, a limit on threads), those started do all the work (they
/// share one queue), and it is an error only when none could be started.
/// Returns how many were started.
pub(crate) fn start_threads<'scope, F>(scope: &'scope std::thread::Scope<'scope, '_>, workers: impl IntoIterator<Item = F>) -> io::Result<usize>
where
    F: FnOnce() + Send + 'scope,
{
    let mut started = 0;
    for worker in workers {
        match std::thread::Builder::new().spawn_scoped(scope, worker) {
            Ok(_) => started += 1,
            Err(e) if started == 0 => return Err(io::Error::new(e.kind(), format!("cannot start a reader thread: {e}"))),
            Err(_) => break,
        }
    }
    Ok(started)
}

/// Below this many bytes `DirectIo::Auto` reads through the cache: the
/// residency check and a second open cost more than they save.
const AUTO_DIRECT_MIN_BYTES: usize = 64 << 20;

/// The policy of [`DirectIo::Auto`], for callers that split a load into many
/// reads of their own (the accelerator staging loads) and decide once per
/// load: whether `len` bytes at `offset` are worth reading past the page
/// cache — a large read (at least 64 MiB) of which less than half is cached.
pub fn prefers_direct(file: &File, offset: u64, len: usize) -> bool {
    len >= AUTO_DIRECT_MIN_BYTES && cached_fraction(file, offset, len) < 0.5
}

/// Cuts `len` bytes at file offset `offset` into pieces of at most `chunk`
/// bytes (one page when `aligned` and `chunk` is smaller): with `aligned`,
/// at the multiples of `chunk` rounded down to whole
/// [`DIRECT_ALIGN`] pages (one page at least) in the file, so that every
/// piece but the first and the last starts and ends on a page, as direct
/// reads need; otherwise every `chunk` bytes from `offset`. The one cutting
/// rule for the engine and the accelerator staging loads (through the binding).
pub fn cut(offset: u64, len: usize, chunk: usize, aligned: bool) -> Vec<(u64, usize)> {
    let size = if aligned { (chunk - chunk % DIRECT_ALIGN).max(DIRECT_ALIGN) } else { chunk.max(1) } as u64;
    // Saturating: a range at the very end of u64 still ends; the caller's
    // bounds checks refuse it.
    let end = offset.saturating_add(len as u64);
    let mut pieces = Vec::with_capacity(len.div_ceil(size as usize).min(1 << 16));
    let mut at = offset;
    while at < end {
        let next = if aligned { (at / size + 1).saturating_mul(size) } else { at.saturating_add(size) };
        let stop = next.min(end);
        pieces.push((at, (stop - at) as usize));
        at = stop;
    }
    pieces
}

/// Reads exactly `dst.len()` bytes at `offset`, bypassing the page cache
/// where it can: the part of the range that is aligned to [`DIRECT_ALIGN`]
/// in the file and in `dst` is read through `direct` (a handle from
/// [`open_direct`]), the unaligned head and tail, or everything when `dst`
/// and the file are aligned differently, through `file`. Returns the number
/// of bytes read past the cache.
pub fn read_exact_at_direct(file: &File, direct: &File, dst: &mut [u8], offset: u64) -> io::Result<usize> {
    let align = DIRECT_ALIGN as u64;
    let congruent = offset % align == (dst.as_ptr() as usize % DIRECT_ALIGN) as u64;
    let head = ((align - offset % align) % align) as usize;
    if !congruent || dst.len() < head + DIRECT_ALIGN {
        read_exact_at(file, dst, offset)?;
        return Ok(0);
    }
    let middle = (dst.len() - head) / DIRECT_ALIGN * DIRECT_ALIGN;
    let (head_part, rest) = dst.split_at_mut(head);
    let (middle_part, tail_part) = rest.split_at_mut(middle);
    read_exact_at(file, head_part, offset)?;
    let went_direct = read_aligned_direct(file, direct, middle_part, offset + head as u64)?;
    read_exact_at(file, tail_part, offset + (head + middle) as u64)?;
    Ok(if went_direct { middle } else { 0 })
}

/// One read of an aligned piece through the direct handle. A read the kernel
/// refuses (EINVAL: it wants a larger alignment) is redone through the
/// cache; returns whether the bytes came past the cache.
fn read_aligned_direct(file: &File, direct: &File, piece: &mut [u8], offset: u64) -> io::Result<bool> {
    match read_exact_at(direct, piece, offset) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => read_exact_at(file, piece, offset).map(|()| false),
        Err(e) => Err(e),
    }
}

/// A second handle on the same open file (not the same path, which may have
/// been replaced since) that bypasses the page cache, or `None` where the
/// filesystem or OS has no direct I/O.
pub fn open_direct(file: &File) -> Option<File> {
    try_open_direct(file).ok()
}

/// [`open_direct`] with the reason it failed: `InvalidInput` (EINVAL) or
/// `Unsupported` where the filesystem or OS has no direct I/O, for good;
/// anything else (a shortage of descriptors) may pass.
pub fn try_open_direct(file: &File) -> io::Result<File> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(format!("/proc/self/fd/{}", file.as_raw_fd()))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = file;
        Err(io::Error::new(io::ErrorKind::Unsupported, "no direct I/O on this OS"))
    }
}

/// Estimated fraction (0.0–1.0) of `len` bytes at `offset` that are in the
/// page cache, from `mincore` over up to 64 windows of 1 MiB spread evenly
/// across the range. 1.0 (assume cached) where it cannot be told.
pub fn cached_fraction(file: &File, offset: u64, len: usize) -> f64 {
    #[cfg(target_os = "linux")]
    {
        const WINDOW: usize = 1 << 20;
        const WINDOWS: usize = 64;
        // SAFETY: sysconf has no preconditions.
        let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
        let (mut resident, mut pages) = (0usize, 0usize);
        let step = (len / WINDOWS).max(WINDOW);
        let mut at = 0usize;
        while at < len {
            let start = (offset + at as u64) / page * page;
            let window = WINDOW.min(len - at) + (offset + at as u64 - start) as usize;
            // SAFETY: a read-only mapping used only for the mincore query.
            let Ok(map) = (unsafe { memmap2::MmapOptions::new().offset(start).len(window).map(file) }) else { return 1.0 };
            let mut vec = vec![0u8; window.div_ceil(page as usize)];
            // SAFETY: `vec` has one byte per page of the mapping.
            if unsafe { libc::mincore(map.as_ptr() as *mut libc::c_void, window, vec.as_mut_ptr()) } != 0 {
                return 1.0;
            }
            resident += vec.iter().filter(|v| **v & 1 == 1).count();
            pages += vec.len();
            at += step;
        }
        if pages == 0 { 1.0 } else { resident as f64 / pages as f64 }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (file, offset, len);
        1.0
    }
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message.to_string())
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

/// Drops the file's cached pages in `offset..offset+len` (`len == 0`: to the
/// end). Advisory: a no-op where the OS has no such call.
pub fn evict(file: &File, offset: u64, len: u64) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on a valid descriptor.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), offset as i64, len as i64, libc::POSIX_FADV_DONTNEED) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
    }
    let _ = (file, offset, len);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    fn quiet(_: Progress) -> io::Result<()> {
        Ok(())
    }

    fn file_with(bytes: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn coalesces_contiguous_ranges_only() {
        let r = |file_offset, dst_offset, len| ReadRange { file_offset, dst_offset, len };
        let merged = coalesce(vec![r(10, 5, 5), r(0, 0, 5), r(5, 50, 5), r(15, 10, 0), r(15, 10, 3)]);
        assert_eq!(merged, vec![r(0, 0, 5), r(5, 50, 5), r(10, 5, 8)]);
    }

    #[test]
    fn rejects_overlaps_and_out_of_bounds() {
        let f = file_with(&[0; 64]);
        let mut dst = vec![0u8; 16];
        let r = |file_offset, dst_offset, len| ReadRange { file_offset, dst_offset, len };
        assert!(read_into(&f, &[r(0, 0, 8), r(32, 4, 8)], &mut dst, &EngineOptions::default(), quiet).is_err());
        assert!(read_into(&f, &[r(0, 10, 8)], &mut dst, &EngineOptions::default(), quiet).is_err());
        // Past the end of the file: an error, not a short read.
        assert!(read_into(&f, &[r(60, 0, 8)], &mut dst, &EngineOptions::default(), quiet).is_err());
    }

    #[test]
    fn bytes_in_flight_stay_within_the_budget() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7) as u8).collect();
        let f = file_with(&data);
        let mut dst = vec![0u8; data.len()];
        let options = EngineOptions { threads: 3, chunk_bytes: 4096, direct: DirectIo::Never };
        let mut heard = Vec::new();
        let stats = read_into(&f, &[ReadRange { file_offset: 0, dst_offset: 0, len: data.len() }], &mut dst, &options, |p| {
            if let Progress::Done(n) = p {
                heard.push(n);
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(dst, data);
        assert!(stats.peak_in_flight <= 3 * 4096, "{stats:?}");
        assert_eq!(stats.reads, (data.len() as u64).div_ceil(4096));
        // Every read reported, in order, ending at the total.
        assert_eq!(heard.len() as u64, stats.reads);
        assert!(heard.windows(2).all(|w| w[0] < w[1]) && heard.last() == Some(&data.len()), "{heard:?}");
    }

    #[test]
    fn an_error_from_progress_stops_the_load_and_is_returned() {
        let data = vec![7u8; 4096 * 400];
        let f = file_with(&data);
        let mut dst = vec![0u8; data.len()];
        let options = EngineOptions { threads: 2, chunk_bytes: 4096, direct: DirectIo::Never };
        let mut calls = 0;
        let error = read_into(&f, &[ReadRange { file_offset: 0, dst_offset: 0, len: data.len() }], &mut dst, &options, |p| {
            calls += usize::from(matches!(p, Progress::Done(_)));
            if calls == 3 { Err(io::Error::other("interrupted")) } else { Ok(()) }
        })
        .unwrap_err();
        assert_eq!(error.to_string(), "interrupted");
        assert_eq!(calls, 3, "nothing is reported after the error");
    }

    #[test]
    fn a_failed_read_stops_the_others_and_is_returned() {
        let f = file_with(&[1u8; 4096 * 100]);
        let mut dst = vec![0u8; 4096 * 200];
        let options = EngineOptions { threads: 2, chunk_bytes: 4096, direct: DirectIo::Never };
        // The second half is past the end of the file.
        let error = read_into(&f, &[ReadRange { file_offset: 0, dst_offset: 0, len: dst.len() }], &mut dst, &options, quiet).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof, "{error}");
    }

    /// A buffer whose data starts `shift` bytes past a page boundary.
    fn shifted_buffer(len: usize, shift: usize) -> (Vec<u8>, usize) {
        let raw = vec![0u8; len + shift + 2 * DIRECT_ALIGN];
        let start = (DIRECT_ALIGN - raw.as_ptr() as usize % DIRECT_ALIGN) % DIRECT_ALIGN + shift;
        (raw, start)
    }

    #[test]
    fn direct_reads_bypass_the_cache_where_aligned_and_match_cached_reads() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 31 % 253) as u8).collect();
        let f = file_with(&data);
        assert!(open_direct(&f).is_some(), "the test's temporary directory should allow O_DIRECT");
        // An unaligned start (like a data section after its header), with the
        // destination aligned like the file: every interior chunk is direct.
        let offset = 4096 * 3 + 1234;
        let len = data.len() - offset - 777;
        let (mut raw, start) = shifted_buffer(len, offset % DIRECT_ALIGN);
        let options = EngineOptions { threads: 3, chunk_bytes: 64 << 10, direct: DirectIo::Always };
        let range = ReadRange { file_offset: offset as u64, dst_offset: 0, len };
        let stats = read_into(&f, &[range], &mut raw[start..start + len], &options, quiet).unwrap();
        assert_eq!(&raw[start..start + len], &data[offset..offset + len]);
        assert_eq!(stats.bytes, len as u64);
        let unaligned = (DIRECT_ALIGN - offset % DIRECT_ALIGN) + (offset + len) % DIRECT_ALIGN;
        assert_eq!(stats.direct_bytes, (len - unaligned) as u64, "{stats:?}");

        // A destination aligned differently from the file: nothing can be direct, all is still right.
        let (mut raw, start) = shifted_buffer(len, offset % DIRECT_ALIGN + 8);
        let stats = read_into(&f, &[range], &mut raw[start..start + len], &options, quiet).unwrap();
        assert_eq!(&raw[start..start + len], &data[offset..offset + len]);
        assert_eq!(stats.direct_bytes, 0);

        // Never: no direct bytes either way.
        let (mut raw, start) = shifted_buffer(len, offset % DIRECT_ALIGN);
        let never = EngineOptions { direct: DirectIo::Never, ..options };
        assert_eq!(read_into(&f, &[range], &mut raw[start..start + len], &never, quiet).unwrap().direct_bytes, 0);
        assert_eq!(&raw[start..start + len], &data[offset..offset + len]);
    }

    #[test]
    fn auto_reads_a_cached_file_through_the_cache_and_an_evicted_one_directly() {
        let data: Vec<u8> = (0..(AUTO_DIRECT_MIN_BYTES as u32 + 8192)).map(|i| (i % 249) as u8).collect();
        let f = file_with(&data);
        f.sync_all().unwrap();
        let (mut raw, start) = shifted_buffer(data.len(), 0);
        let dst = &mut raw[start..start + data.len()];
        let range = ReadRange { file_offset: 0, dst_offset: 0, len: data.len() };
        let options = EngineOptions::default();
        assert_eq!(options.direct, DirectIo::Auto);
        // Just written: in the cache.
        assert!(cached_fraction(&f, 0, data.len()) > 0.5);
        assert!(!prefers_direct(&f, 0, data.len()));
        assert_eq!(read_into(&f, &[range], dst, &options, quiet).unwrap().direct_bytes, 0);
        evict(&f, 0, 0).unwrap();
        assert!(cached_fraction(&f, 0, data.len()) < 0.5);
        assert!(prefers_direct(&f, 0, data.len()));
        assert!(!prefers_direct(&f, 0, AUTO_DIRECT_MIN_BYTES - 1), "small reads go through the cache");
        let stats = read_into(&f, &[range], dst, &options, quiet).unwrap();
        assert_eq!(stats.direct_bytes, data.len() as u64);
        assert!(dst == &data[..]);
    }

    proptest! {
        #[test]
        fn one_read_goes_direct_exactly_where_file_and_buffer_align(
            offset in 0usize..20000,
            len in 0usize..12000,
            shift in prop_oneof![Just(None), (0usize..4096).prop_map(Some)],
        ) {
            let data: Vec<u8> = (0..32000u32).map(|i| (i % 247) as u8).collect();
            let f = file_with(&data);
            let direct = open_direct(&f).expect("O_DIRECT in the test's temporary directory");
            let len = len.min(data.len() - offset);
            // `None`: the buffer aligned like the file; otherwise an arbitrary shift.
            let congruent = shift.is_none_or(|s| s == offset % DIRECT_ALIGN);
            let (mut raw, start) = shifted_buffer(len, shift.unwrap_or(offset % DIRECT_ALIGN));
            let went_direct = read_exact_at_direct(&f, &direct, &mut raw[start..start + len], offset as u64).unwrap();
            prop_assert_eq!(&raw[start..start + len], &data[offset..offset + len]);
            let head = (DIRECT_ALIGN - offset % DIRECT_ALIGN) % DIRECT_ALIGN;
            let expected = if congruent && len >= head + DIRECT_ALIGN { (len - head) / DIRECT_ALIGN * DIRECT_ALIGN } else { 0 };
            prop_assert_eq!(went_direct, expected);
        }

        #[test]
        fn cuts_cover_the_range_in_order_and_aligned_cuts_sit_on_pages(
            offset in 0u64..50_000,
            len in 0usize..100_000,
            chunk in 1usize..40_000,
            aligned in any::<bool>(),
        ) {
            let pieces = cut(offset, len, chunk, aligned);
            let page = DIRECT_ALIGN as u64;
            let mut at = offset;
            for (i, &(start, n)) in pieces.iter().enumerate() {
                prop_assert_eq!(start, at);
                prop_assert!(n > 0 && n <= chunk.max(DIRECT_ALIGN));
                if aligned {
                    // Interior cuts on pages, and on the same grid: every
                    // whole piece has one length, at most `chunk` rounded down.
                    if i > 0 { prop_assert_eq!(start % page, 0); }
                    if i + 1 < pieces.len() { prop_assert_eq!((start + n as u64) % page, 0); }
                    if i > 0 && i + 1 < pieces.len() {
                        prop_assert_eq!(n, pieces[1].1);
                        prop_assert!(n.is_multiple_of(DIRECT_ALIGN) && (n <= chunk || n == DIRECT_ALIGN));
                    }
                } else if i + 1 < pieces.len() {
                    prop_assert_eq!(n, chunk);
                }
                at += n as u64;
            }
            prop_assert_eq!(at, offset + len as u64);
        }

        #[test]
        fn scattered_ranges_land_where_planned(
            pieces in prop::collection::vec((0usize..20000, 0usize..9000), 0..30),
            threads in 1usize..6,
            chunk in 1usize..3,
            direct in prop_oneof![Just(DirectIo::Never), Just(DirectIo::Always)],
            shift in 0usize..4096,
        ) {
            let data: Vec<u8> = (0..30000u32).map(|i| (i % 251) as u8).collect();
            let f = file_with(&data);
            // Give each piece its own place in the destination, in shuffled order.
            let mut ranges = Vec::new();
            let mut at = 0;
            for (offset, len) in pieces.iter().rev() {
                ranges.push(ReadRange { file_offset: *offset as u64, dst_offset: at, len: *len });
                at += len;
            }
            // Any alignment of the destination: direct reads where it matches the file's.
            let (mut raw, start) = shifted_buffer(at, shift);
            let dst = &mut raw[start..start + at];
            read_into(&f, &ranges, dst, &EngineOptions { threads, chunk_bytes: chunk * 4096, direct }, quiet).unwrap();
            for r in &ranges {
                prop_assert_eq!(&dst[r.dst_offset..r.dst_offset + r.len], &data[r.file_offset as usize..r.file_offset as usize + r.len]);
            }
        }
    }
}
