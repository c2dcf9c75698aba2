//! Reading a mapped file into the page cache ahead of the thread that
//! faults it in.
//!
//! A lazy load through a mapping reads the file one page fault at a time,
//! and the faulting thread does all the kernel's work: it allocates every
//! page-cache page, issues the readahead and waits for it. [`Prefetch`]
//! moves that work to a background thread, which asks the kernel for the
//! file step by step (`posix_fadvise(WILLNEED)`: pages allocated and reads
//! queued, no copy) while the caller's thread only maps pages that are
//! already there or on their way. On the 2-core development VM, where fresh
//! memory also faults on the host, a cold `load_file` plus a first touch
//! of every page went from a median of 1.5–2.1 s to 0.75–0.85 s for 1 GiB,
//! below the 4-thread raw read (`bench/load_bench.py`).
//!
//! One process-wide thread serves the requests in order, so the shards of a
//! checkpoint are read one after the other rather than competing. It only
//! fills free memory: it stops once free RAM would drop under an eighth of
//! the total, and never pushes other pages out of the cache for a file that
//! may not be read in full. A request stops when its [`Prefetch`] is
//! dropped.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, OnceLock};

/// Bytes asked for at a time. Measured on the development VM (1 GiB, cold,
/// medians of 6): 2 MiB 0.92 s, 8 MiB 0.75 s, 32 MiB 0.88 s, 128 MiB 1.95 s
/// (a large step makes the toucher wait for all of it).
pub const PREFETCH_STEP: u64 = 8 << 20;

/// A request to read part of a file into the page cache in the background;
/// dropping it stops the reading (after the step under way).
pub struct Prefetch {
    shared: Arc<Shared>,
}

/// What a request and the background thread share.
struct Shared {
    stop: AtomicBool,
    /// Bytes asked for so far.
    done: AtomicU64,
}

/// One request, as the background thread holds it.
struct Job {
    file: File,
    offset: u64,
    len: u64,
    shared: Arc<Shared>,
}

impl Prefetch {
    /// Starts reading `len` bytes of `file` at `offset` into the page cache on
    /// the background thread, after the requests before it. `file` is a handle
    /// of its own (`try_clone` of the caller's). Where the OS has no such
    /// advice (not Linux) nothing is read.
    pub fn start(file: File, offset: u64, len: u64) -> Prefetch {
        let shared = Arc::new(Shared { stop: AtomicBool::new(false), done: AtomicU64::new(0) });
        if cfg!(target_os = "linux") {
            let job = Job { file, offset, len, shared: shared.clone() };
            // A send fails only if the thread is gone (it could not be
            // spawned): the load then stays lazy, as without prefetching.
            let _ = worker().send(job);
        }
        Prefetch { shared }
    }

    /// Bytes asked for so far (for tests and diagnostics).
    pub fn requested(&self) -> u64 {
        self.shared.done.load(Ordering::Relaxed)
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// The background thread's queue, the thread started on first use. No
/// lock around it: a child forked while another thread held one would
/// wait on it for good (in a child the requests just wait, unserved).
fn worker() -> &'static Sender<Job> {
    static QUEUE: OnceLock<Sender<Job>> = OnceLock::new();
    QUEUE.get_or_init(|| {
        let (send, receive) = channel::<Job>();
        let spawned = std::thread::Builder::new().name("tensafe-prefetch".into()).spawn(move || {
            for job in receive {
                run(&job, free_memory_floor(), PREFETCH_STEP);
            }
        });
        drop(spawned); // detached; if it could not start, sends fail and nothing is read
        send
    })
}

/// Asks for `job`'s range in `step`s until it is done, stopped, or free
/// memory would fall under `floor` bytes; returns the bytes asked for.
fn run(job: &Job, floor: u64, step: u64) -> u64 {
    let mut at = 0;
    while at < job.len && !job.shared.stop.load(Ordering::Relaxed) {
        let len = step.min(job.len - at);
        if free_memory().is_some_and(|free| free < floor.saturating_add(len)) {
            break;
        }
        if will_need(&job.file, job.offset + at, len).is_err() {
            break; // advice the filesystem refuses: the load stays lazy
        }
        at += len;
        job.shared.done.store(at, Ordering::Relaxed);
    }
    at
}

/// Free memory under which prefetching stops: an eighth of RAM.
fn free_memory_floor() -> u64 {
    total_memory().map_or(u64::MAX, |total| total / 8)
}

/// Asks the kernel to read `len` bytes at `offset` into the page cache; it
/// returns once the reads are queued.
fn will_need(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(std::io::ErrorKind::InvalidInput.into());
        };
        // SAFETY: plain syscall on a valid descriptor.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_WILLNEED) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
    }
    let _ = (file, offset, len);
    Ok(())
}

/// Free RAM (not counting the page cache) and total RAM in bytes, where
/// they can be told.
#[allow(clippy::useless_conversion)] // c_ulong is 32 bits on 32-bit targets
fn memory() -> Option<(u64, u64)> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sysinfo fills the struct it is given (all-zero is a valid value).
        let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
        if unsafe { libc::sysinfo(&mut info) } != 0 {
            return None;
        }
        let bytes = |units| u64::from(units).saturating_mul(u64::from(info.mem_unit));
        Some((bytes(info.freeram), bytes(info.totalram)))
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// Free RAM in bytes, where it can be told.
fn free_memory() -> Option<u64> {
    memory().map(|(free, _)| free)
}

/// Total RAM in bytes, where it can be told.
fn total_memory() -> Option<u64> {
    memory().map(|(_, total)| total)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::io::Write;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::{cached_fraction, evict};

    /// A file of `len` bytes on disk, evicted from the page cache; `None`
    /// (the test is skipped, with a message) where eviction does not work
    /// (tmpfs, a kernel that keeps the cache).
    fn evicted_file(len: usize) -> Option<(tempfile::NamedTempFile, File)> {
        let mut temp = tempfile::NamedTempFile::new().unwrap();
        let block: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        for _ in 0..len / block.len() {
            temp.write_all(&block).unwrap();
        }
        temp.as_file().sync_all().unwrap();
        let file = File::open(temp.path()).unwrap();
        evict(&file, 0, 0).unwrap();
        if cached_fraction(&file, 0, len) > 0.1 {
            eprintln!("skipped: eviction does not empty the page cache here");
            return None;
        }
        Some((temp, file))
    }

    fn job(file: &File, len: u64) -> Job {
        let shared = Arc::new(Shared { stop: AtomicBool::new(false), done: AtomicU64::new(0) });
        Job { file: file.try_clone().unwrap(), offset: 0, len, shared }
    }

    /// Waits until the first `len` bytes of `file` are cached (the reads
    /// asked for complete in the background); fails after 20 s.
    fn wait_until_cached(file: &File, len: usize, asked: impl Fn() -> u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while cached_fraction(file, 0, len) < 0.99 {
            assert!(Instant::now() < deadline, "the file is not cached after 20 s ({} bytes asked for)", asked());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_prefetch_fills_the_page_cache_in_the_background() {
        let Some((_temp, file)) = evicted_file(32 << 20) else { return };
        let prefetch = Prefetch::start(file.try_clone().unwrap(), 0, 32 << 20);
        wait_until_cached(&file, 32 << 20, || prefetch.requested());
        assert_eq!(prefetch.requested(), 32 << 20);
    }

    #[test]
    fn a_request_asks_for_its_range_in_steps() {
        let Some((_temp, file)) = evicted_file(16 << 20) else { return };
        // A range that does not end on a step: the last step is short.
        let job = job(&file, (16 << 20) - 5);
        assert_eq!(run(&job, 0, 3 << 20), (16 << 20) - 5);
        assert_eq!(job.shared.done.load(Ordering::Relaxed), (16 << 20) - 5);
        wait_until_cached(&file, (16 << 20) - 5, || job.shared.done.load(Ordering::Relaxed));
    }

    #[test]
    fn a_stopped_request_asks_for_nothing_more() {
        let Some((_temp, file)) = evicted_file(16 << 20) else { return };
        let stopped = job(&file, 16 << 20);
        stopped.shared.stop.store(true, Ordering::Relaxed);
        assert_eq!(run(&stopped, 0, PREFETCH_STEP), 0);
        assert!(cached_fraction(&file, 0, 16 << 20) < 0.1);
    }

    #[test]
    fn prefetching_never_eats_into_the_free_memory_floor() {
        let Some((_temp, file)) = evicted_file(16 << 20) else { return };
        let free = free_memory().expect("sysinfo works on Linux");
        // A floor above what is free: not one step is asked for.
        assert_eq!(run(&job(&file, 16 << 20), free + (1 << 30), PREFETCH_STEP), 0);
        assert!(cached_fraction(&file, 0, 16 << 20) < 0.1);
        assert!(free_memory_floor() > 0 && free_memory_floor() < total_memory().unwrap());
    }
}
