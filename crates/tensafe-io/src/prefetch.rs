//! Reading a mapped file into the page cache ahead of the thread that
//! faults it in.
//!
//! A lazy load through a mapping reads the file one page fault at a time,
//! and the faulting thread does all the kernel's work: it allocates every
//! page-cache page, issues the readahead and waits for it. [`Prefetch`]
//! moves that work to a background thread, which asks the kernel for the
//! file piece by piece (`madvise(WILLNEED)` on the mapping, which the
//! kernel serves as `posix_fadvise(WILLNEED)` on the file: pages allocated
//! and reads queued, no copy, and no file descriptor needed) while the
//! caller's thread only maps pages that are already there or on their
//! way. On the 2-core development VM, where fresh memory also faults on the
//! host, a cold `load_file` plus a first touch of
//! every page of 1 GiB took a median of 0.59 s with it, 1.33 s without it,
//! against 0.79–0.89 s for a raw 4-thread read (docs/ARCHITECTURE.md).
//!
//! One process-wide thread serves the requests in order, so the shards of a
//! checkpoint are read one after the other rather than competing. A request
//! runs only if its file fits: at most half of the memory the kernel
//! reports available, and, with the files of the other live requests, at
//! most half of RAM; otherwise its load stays lazy, so a checkpoint larger
//! than memory is not read twice. A request stops when its [`Prefetch`] is
//! dropped. Linux only; elsewhere nothing is read ahead.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::Arc;

/// A whole mapped file, whose pages a request reads ahead: it stays mapped
/// as long as this lives.
pub trait Mapped: Send + Sync {
    /// Where the mapping starts (a page boundary, as for any mapping of a
    /// file from its start) and its length. An address, not a slice: the
    /// request never reads the bytes, which the caller's threads may be
    /// writing into (a copy-on-write mapping).
    fn region(&self) -> (*const u8, usize);
}

/// A request to read part of a file into the page cache in the background;
/// dropping it stops the reading (after the call under way).
pub struct Prefetch {
    shared: Arc<Shared>,
}

/// What a request and the background thread share.
struct Shared {
    stop: AtomicBool,
    /// The mapping (a boxed `Arc` made raw) until the background thread
    /// takes it to run the request, or the request is dropped: a request
    /// stopped while it waits in the queue does not keep the mapping alive
    /// until the thread reaches it. An atomic, not a lock: `Prefetch::drop`
    /// may run in a forked child.
    mapping: AtomicPtr<Arc<dyn Mapped>>,
    /// Bytes asked for so far.
    done: AtomicU64,
    /// The request's length while it counts in `live` (0 before it is let
    /// run, and after its `Prefetch` is dropped).
    counted: AtomicU64,
    /// Where it counts: [`LIVE`] (the tests' own counters elsewhere).
    live: &'static AtomicU64,
}

impl Shared {
    fn new(mapping: Arc<dyn Mapped>, live: &'static AtomicU64) -> Arc<Shared> {
        let mapping = AtomicPtr::new(Box::into_raw(Box::new(mapping)));
        Arc::new(Shared { stop: AtomicBool::new(false), mapping, done: AtomicU64::new(0), counted: AtomicU64::new(0), live })
    }

    /// The mapping, taken (once: `None` after).
    fn take_mapping(&self) -> Option<Arc<dyn Mapped>> {
        let raw = self.mapping.swap(std::ptr::null_mut(), Ordering::SeqCst);
        // SAFETY: a non-null pointer here came from `Box::into_raw` in `new`,
        // and the swap hands it to one caller only.
        (!raw.is_null()).then(|| *unsafe { Box::from_raw(raw) })
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        drop(self.take_mapping());
    }
}

/// Bytes of the files of the requests let run whose `Prefetch` is alive:
/// what they have brought, or will bring, into the page cache.
static LIVE: AtomicU64 = AtomicU64::new(0);

/// One request, as the background thread holds it.
struct Job {
    offset: u64,
    len: u64,
    /// The most one advice asks for ([`advice_limit`]).
    limit: u64,
    shared: Arc<Shared>,
}

impl Prefetch {
    /// Starts reading `len` bytes of the mapped file `mapping` at `offset`
    /// into the page cache on the background thread, after the requests
    /// before it, in calls of at most `limit` bytes ([`advice_limit`] of
    /// the file). The request holds the mapping, not the file: no
    /// descriptor stays open for it.
    pub fn start(mapping: Arc<dyn Mapped>, offset: u64, len: u64, limit: u64) -> Prefetch {
        let shared = Shared::new(mapping, &LIVE);
        if cfg!(target_os = "linux")
            && let Some(queue) = worker()
        {
            // A send fails only if the thread is gone: the load stays lazy.
            let _ = queue.send(Job { offset, len, limit, shared: shared.clone() });
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
        // Atomics only (no lock): this may run in a forked child. SeqCst
        // with `admit`: the request is uncounted here or there, never twice
        // or not at all.
        self.shared.stop.store(true, Ordering::SeqCst);
        drop(self.shared.take_mapping());
        self.shared.live.fetch_sub(self.shared.counted.swap(0, Ordering::SeqCst), Ordering::SeqCst);
    }
}

/// This process's background thread's queue, the thread started on first
/// use, and again in a process forked after that: a thread does not survive
/// a fork, and the parent's channel may have been mid-send at the fork, so
/// a child leaves the parent's queue alone and starts its own. `None` if no
/// thread could be started: loads stay lazy.
fn worker() -> Option<&'static Sender<Job>> {
    /// The queue and the process it serves; a new one replaces it in a
    /// forked child. Never freed: the process's thread holds its end.
    static QUEUE: AtomicPtr<(u32, Sender<Job>)> = AtomicPtr::new(std::ptr::null_mut());
    let pid = std::process::id();
    let seen = QUEUE.load(Ordering::Acquire);
    // SAFETY: a non-null pointer in QUEUE came from `Box::into_raw` below and is never freed.
    if let Some((owner, queue)) = unsafe { seen.as_ref() }
        && *owner == pid
    {
        return Some(queue);
    }
    let (send, receive) = channel::<Job>();
    let spawned = std::thread::Builder::new().name("tensafe-prefetch".into()).spawn(move || {
        for job in receive {
            // Held while it runs; a request dropped while queued has let go of it.
            let Some(mapping) = job.shared.take_mapping() else { continue };
            if admit(&job, memory_info()) {
                run(&job, mapping.region(), job.limit, will_need);
            }
        }
    });
    drop(spawned.ok()?); // detached
    let fresh = Box::into_raw(Box::new((pid, send)));
    match QUEUE.compare_exchange(seen, fresh, Ordering::AcqRel, Ordering::Acquire) {
        // SAFETY: just stored, never freed.
        Ok(_) => Some(unsafe { &(*fresh).1 }),
        Err(other) => {
            // Another thread of this process was first: dropping this sender
            // ends the thread just started.
            // SAFETY: `fresh` was never shared.
            drop(unsafe { Box::from_raw(fresh) });
            // SAFETY: as above, from `Box::into_raw` and never freed.
            unsafe { other.as_ref() }.filter(|(owner, _)| *owner == pid).map(|(_, queue)| queue)
        }
    }
}

/// Whether `job` may run, given (available, total) memory in bytes; if so,
/// it now counts among the live requests until its `Prefetch` is dropped.
/// Unknown memory (no `/proc/meminfo`) lets nothing run.
fn admit(job: &Job, memory: Option<(u64, u64)>) -> bool {
    let (Some((available, total)), shared) = (memory, &job.shared) else { return false };
    if shared.stop.load(Ordering::SeqCst) || job.len > available / 2 || shared.live.load(Ordering::SeqCst).saturating_add(job.len) > total / 2 {
        return false;
    }
    shared.live.fetch_add(job.len, Ordering::SeqCst);
    shared.counted.store(job.len, Ordering::SeqCst);
    // Dropped meanwhile: `drop` may have found nothing counted yet.
    if shared.stop.load(Ordering::SeqCst) {
        shared.live.fetch_sub(shared.counted.swap(0, Ordering::SeqCst), Ordering::SeqCst);
        return false;
    }
    true
}

/// Asks for `job`'s range of the mapped `region` with `advise` in calls of
/// at most `limit` bytes until it is done or stopped; returns the bytes
/// asked for.
fn run(job: &Job, region: (*const u8, usize), limit: u64, mut advise: impl FnMut((*const u8, usize), u64, u64) -> io::Result<()>) -> u64 {
    let mut at = 0;
    while at < job.len && !job.shared.stop.load(Ordering::Relaxed) {
        let len = limit.max(1).min(job.len - at);
        if advise(region, job.offset + at, len).is_err() {
            break; // advice the filesystem refuses: the load stays lazy
        }
        at += len;
        job.shared.done.store(at, Ordering::Relaxed);
    }
    at
}

/// The most one `WILLNEED` reads for sure. The kernel reads at most the
/// larger of the device's largest request (`max_sectors_kb`) and the
/// file's readahead window, and quietly drops the rest; the first holds
/// whatever the window is. 128 KiB (the kernel's default window) where the
/// device cannot be told (network filesystems, overlays).
pub fn advice_limit(file: &File) -> u64 {
    const DEFAULT: u64 = 128 << 10;
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = file.metadata() else { return DEFAULT };
        let device = format!("/sys/dev/block/{}:{}", libc::major(meta.dev()), libc::minor(meta.dev()));
        // A whole disk has queue/ itself; a partition's is its disk's.
        for queue in ["queue", "../queue"] {
            let setting = std::fs::read_to_string(format!("{device}/{queue}/max_sectors_kb"));
            if let Some(kib) = setting.ok().and_then(|text| text.trim().parse::<u64>().ok()).filter(|kib| *kib > 0) {
                return kib.saturating_mul(1024);
            }
        }
    }
    let _ = file;
    DEFAULT
}

/// Asks the kernel to read `len` bytes at `offset` of the mapped file
/// `(base, size)` into the page cache (the pages the range touches); it
/// returns once the reads are queued.
fn will_need((base, size): (*const u8, usize), offset: u64, len: u64) -> io::Result<()> {
    let end = offset.checked_add(len).filter(|&end| end <= size as u64).ok_or(io::ErrorKind::InvalidInput)?;
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
        let base = base as usize;
        debug_assert_eq!(base % page, 0, "a mapping starts on a page");
        let start = (base + offset as usize) / page * page;
        // SAFETY: [start, base + end) lies in the mapping (its start is a
        // page boundary), which the caller keeps mapped; WILLNEED changes no
        // memory, it only asks the kernel to read the file behind it.
        let rc = unsafe { libc::madvise(start as *mut libc::c_void, base + end as usize - start, libc::MADV_WILLNEED) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let _ = end;
    Ok(())
}

/// (available, total) memory in bytes from `/proc/meminfo`, where there is one.
fn memory_info() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| {
        let line = text.lines().find_map(|line| line.strip_prefix(name))?;
        let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
        Some(kib.saturating_mul(1024))
    };
    Some((field("MemAvailable:")?, field("MemTotal:")?))
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

    /// A stand-in for a mapping, for requests that are not run on it.
    struct NoBytes;

    impl Mapped for memmap2::Mmap {
        fn region(&self) -> (*const u8, usize) {
            (self.as_ptr(), self.len())
        }
    }

    impl Mapped for NoBytes {
        fn region(&self) -> (*const u8, usize) {
            (std::ptr::null(), 0)
        }
    }

    /// No mapping, for requests run with a stand-in advice.
    const NOWHERE: (*const u8, usize) = (std::ptr::null(), 0);

    /// A request for the first `len` bytes of `mapping`, and its handle,
    /// counted in `live`.
    fn request_in(mapping: Arc<dyn Mapped>, len: u64, live: &'static AtomicU64) -> (Job, Prefetch) {
        let shared = Shared::new(mapping, live);
        (Job { offset: 0, len, limit: 1 << 20, shared: shared.clone() }, Prefetch { shared })
    }

    /// A request for the first `len` bytes of a stand-in mapping, counted apart.
    fn request(len: u64) -> (Job, Prefetch) {
        request_in(Arc::new(NoBytes), len, Box::leak(Box::default()))
    }

    /// `file` mapped, as the loads map it.
    fn mapped(file: &File) -> memmap2::Mmap {
        // SAFETY: the tests' own files, not changed while mapped.
        unsafe { memmap2::Mmap::map(file) }.unwrap()
    }

    /// Waits until the first `len` bytes of `file` are cached (the reads
    /// asked for complete in the background); fails after 20 s.
    fn wait_until_cached(file: &File, len: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while cached_fraction(file, 0, len) < 0.99 {
            let cached = cached_fraction(file, 0, len);
            assert!(Instant::now() < deadline, "only {:.0}% of the file is cached after 20 s", cached * 100.0);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_prefetch_fills_the_page_cache_in_the_background() {
        let Some((_temp, file)) = evicted_file(32 << 20) else { return };
        if memory_info().is_none_or(|(available, _)| available <= 1 << 30) {
            eprintln!("skipped: under 1 GiB of memory available");
            return;
        }
        let prefetch = Prefetch::start(Arc::new(mapped(&file)), 0, 32 << 20, advice_limit(&file));
        wait_until_cached(&file, 32 << 20);
        assert_eq!(prefetch.requested(), 32 << 20);
    }

    #[test]
    fn every_byte_is_read_ahead_though_the_kernel_caps_each_call() {
        let Some((_temp, file)) = evicted_file(32 << 20) else { return };
        // One call for the whole file reads only its first few MiB (on the
        // development VM 8 of 32: the readahead window), and says nothing.
        let map = mapped(&file);
        will_need(map.region(), 0, 32 << 20).unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let one_call = cached_fraction(&file, 0, 32 << 20);
        evict(&file, 0, 0).unwrap();
        let (job, _prefetch) = request(32 << 20);
        assert_eq!(run(&job, map.region(), advice_limit(&file), will_need), 32 << 20);
        wait_until_cached(&file, 32 << 20);
        eprintln!("one call of 32 MiB cached {:.0}% of it; calls of {} KiB cached it all", one_call * 100.0, advice_limit(&file) >> 10);
    }

    #[test]
    fn a_request_is_asked_for_in_order_in_calls_of_at_most_the_limit() {
        let (job, _prefetch) = request((16 << 20) - 5);
        let mut calls = Vec::new();
        let asked = run(&job, NOWHERE, 3 << 20, |_, offset, len| {
            calls.push((offset, len));
            Ok(())
        });
        assert_eq!(asked, (16 << 20) - 5);
        assert_eq!(job.shared.done.load(Ordering::Relaxed), asked);
        assert!(calls.iter().all(|&(_, len)| len > 0 && len <= 3 << 20), "{calls:?}");
        let mut next = 0;
        for &(offset, len) in &calls {
            assert_eq!(offset, next, "{calls:?}");
            next += len;
        }
        assert_eq!(next, asked);
    }

    #[test]
    fn dropping_the_prefetch_stops_its_request() {
        let (job, prefetch) = request(64 << 20);
        let mut prefetch = Some(prefetch);
        let asked = run(&job, NOWHERE, 1 << 20, |_, _, _| {
            drop(prefetch.take()); // dropped during the first call
            Ok(())
        });
        assert_eq!(asked, 1 << 20);
    }

    #[test]
    fn a_request_holds_its_mapping_until_taken_to_run_or_dropped() {
        let mapping: Arc<dyn Mapped> = Arc::new(NoBytes);
        let live: &'static AtomicU64 = Box::leak(Box::default());
        // Dropped while queued: the mapping is let go at once, and the thread finds none.
        let (job, prefetch) = request_in(mapping.clone(), 1, live);
        assert_eq!(Arc::strong_count(&mapping), 2);
        drop(prefetch);
        assert_eq!(Arc::strong_count(&mapping), 1);
        assert!(job.shared.take_mapping().is_none());
        // Taken to run: held by the thread, once.
        let (job, _prefetch) = request_in(mapping.clone(), 1, live);
        let taken = job.shared.take_mapping().unwrap();
        assert!(job.shared.take_mapping().is_none());
        drop(taken);
        assert_eq!(Arc::strong_count(&mapping), 1);
        // Never taken (no thread to take it): let go with the request.
        drop(request_in(mapping.clone(), 1, live));
        assert_eq!(Arc::strong_count(&mapping), 1);
    }

    #[test]
    fn a_refused_advice_stops_the_request() {
        let (job, _prefetch) = request(8 << 20);
        let mut calls = 0;
        assert_eq!(run(&job, NOWHERE, 1 << 20, |_, _, _| if { calls += 1; calls } == 3 { Err(io::ErrorKind::Unsupported.into()) } else { Ok(()) }), 2 << 20);
    }

    #[test]
    fn only_files_that_fit_in_memory_are_read_ahead() {
        let live: &'static AtomicU64 = Box::leak(Box::default());
        let request_of = |len| request_in(Arc::new(NoBytes), len, live);
        let gib = 1u64 << 30;
        let memory = Some((16 * gib, 32 * gib)); // (available, total)
        let (large, _large) = request_of(9 * gib);
        assert!(!admit(&large, memory), "over half of what is available");
        let (first, first_handle) = request_of(8 * gib);
        assert!(!admit(&first, None), "memory unknown");
        assert!(admit(&first, memory));
        let (second, second_handle) = request_of(8 * gib);
        assert!(admit(&second, memory));
        assert_eq!(live.load(Ordering::SeqCst), 16 * gib);
        // With the live ones, over half of RAM (though it fits what is available).
        let (third, _third) = request_of(gib);
        assert!(!admit(&third, memory));
        // A dropped request leaves the count, once, and is not let run.
        drop(first_handle);
        assert_eq!(live.load(Ordering::SeqCst), 8 * gib);
        assert!(!admit(&first, memory));
        assert!(admit(&third, memory));
        drop(second_handle);
        assert_eq!(live.load(Ordering::SeqCst), gib);
    }
}
