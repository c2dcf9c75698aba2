//! Staged loads: reader threads read chunks of a file into a bounded set of
//! staging slots and hand each one to a [`Sink`] (a device, or host memory)
//! that copies it out, possibly asynchronously.
//!
//! There is no central scheduler: every reader takes the next chunk from a
//! shared counter, waits until the last copy out of its next slot has
//! completed, reads into the slot and starts the copy, on its own
//! [`Sink::Lane`] (a CUDA stream). Slots are split between the readers, so a
//! reader only ever waits for its own copies. The thread that calls [`stage`]
//! only reports progress. Nothing here needs Python's GIL, which is the point:
//! the Python schedules in `_pipeline.py` take it for every chunk.

use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;

pub use crate::progress::Progress;

/// One chunk of the plan: `len` bytes at `offset` in the source (and in the
/// destination), read to `place` in a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Offset in the source's data section and in the destination.
    pub offset: usize,
    /// Length in bytes.
    pub len: usize,
    /// Where the chunk lands in a slot (a direct read keeps the file
    /// offset's place within a page).
    pub place: usize,
}

/// Where staged chunks go.
///
/// The engine calls [`Sink::lane`] once per reader thread, on that thread;
/// [`Sink::copy`] may return before the copy has read `src` — the engine
/// does not write to `src` again, nor return, before passing the returned
/// handle to [`Sink::wait`], also after errors. [`Sink::close`] must not
/// return while a copy it started may still run. A lane dropped without
/// `close` may leak and leave copies running.
pub trait Sink: Sync {
    /// Per-reader state (a device stream).
    type Lane;
    /// A copy that may still be running (a device event).
    type InFlight;
    /// What fails.
    type Error: Send + From<io::Error>;

    /// Bytes the destination holds.
    fn dst_len(&self) -> usize;
    /// Sets up the calling reader thread.
    fn lane(&self) -> Result<Self::Lane, Self::Error>;
    /// Starts copying `src` to `offset` in the destination.
    ///
    /// # Safety
    /// `offset + src.len()` is at most [`Sink::dst_len`], no other copy writes
    /// that range, and `src` stays alive and unwritten until the returned
    /// handle has been given to [`Sink::wait`] (or the lane to [`Sink::close`]).
    unsafe fn copy(&self, lane: &mut Self::Lane, offset: usize, src: &[u8]) -> Result<Self::InFlight, Self::Error>;
    /// Blocks until `copy` has completed.
    fn wait(&self, lane: &mut Self::Lane, copy: Self::InFlight) -> Result<(), Self::Error>;
    /// Ends a lane; called after every copy on it was waited for, errors included.
    fn close(&self, lane: Self::Lane) -> Result<(), Self::Error>;
}

/// What a staged load did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// Chunks read and copied.
    pub chunks: usize,
    /// The most reads in flight at once.
    pub max_reading: usize,
    /// Bytes the read function reported as read past the page cache.
    pub direct_bytes: u64,
}

/// Reads every chunk with `read` (into its place in a slot) and copies it to
/// `sink`, with `readers` threads sharing `slots` (each slot belongs to one
/// reader). `progress` is called on the calling thread after each chunk and
/// while it waits for one ([`Progress`]); an error from it stops the
/// readers. The first error is returned, after every copy has completed; a
/// reader that panics stops the load the same way.
///
/// Chunks must not overlap, and must fit every slot and the destination.
pub fn stage<S, R, P>(
    chunks: &[Chunk],
    slots: Vec<&mut [u8]>,
    readers: usize,
    sink: &S,
    read: R,
    mut progress: P,
) -> Result<Report, S::Error>
where
    S: Sink,
    R: Fn(&Chunk, &mut [u8]) -> Result<u64, S::Error> + Sync,
    P: FnMut(Progress) -> Result<(), S::Error>,
{
    check_plan(chunks, &slots, sink.dst_len())?;
    if chunks.is_empty() {
        return Ok(Report::default());
    }
    let readers = readers.clamp(1, slots.len());
    let mut shares: Vec<Vec<&mut [u8]>> = (0..readers).map(|_| Vec::new()).collect();
    for (i, slot) in slots.into_iter().enumerate() {
        shares[i % readers].push(slot);
    }
    let shared = Shared {
        chunks,
        next: AtomicUsize::new(0),
        reading: AtomicUsize::new(0),
        max_reading: AtomicUsize::new(0),
        direct_bytes: AtomicU64::new(0),
        failed: AtomicBool::new(false),
        first_error: Mutex::new(None),
    };
    let (done_tx, done_rx) = mpsc::channel::<usize>();
    let mut report = Report::default();
    std::thread::scope(|scope| {
        let readers = shares.into_iter().map(|share| {
            let done_tx = done_tx.clone();
            let (shared, read) = (&shared, &read);
            move || shared.run_reader(share, sink, read, done_tx)
        });
        if let Err(e) = crate::start_threads(scope, readers) {
            shared.stop(e.into());
        }
        drop(done_tx);
        report.chunks = crate::progress::relay(done_rx, &mut progress, || shared.failed.load(Ordering::Relaxed), |e| shared.stop(e)).messages;
    });
    if let Some(e) = shared.first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    report.max_reading = shared.max_reading.into_inner();
    report.direct_bytes = shared.direct_bytes.into_inner();
    Ok(report)
}

/// Refuses plans whose chunks overlap or do not fit the smallest slot or the
/// destination (`dst_len` bytes), before anything is read.
fn check_plan(chunks: &[Chunk], slots: &[&mut [u8]], dst_len: usize) -> io::Result<()> {
    let invalid = |what: String| Err(io::Error::new(io::ErrorKind::InvalidInput, what));
    if !chunks.is_empty() && slots.is_empty() {
        return invalid("a staged load needs at least one slot".into());
    }
    let smallest = slots.iter().map(|s| s.len()).min().unwrap_or(0);
    let mut sorted: Vec<&Chunk> = chunks.iter().collect();
    sorted.sort_by_key(|c| c.offset);
    for (i, chunk) in sorted.iter().enumerate() {
        if chunk.place.checked_add(chunk.len).is_none_or(|end| end > smallest) {
            return invalid(format!("chunk at {} ({} bytes at {}) does not fit a {smallest}-byte slot", chunk.offset, chunk.len, chunk.place));
        }
        if chunk.offset.checked_add(chunk.len).is_none_or(|end| end > dst_len) {
            return invalid(format!("chunk at {} ({} bytes) is outside the {dst_len}-byte destination", chunk.offset, chunk.len));
        }
        if let Some(next) = sorted.get(i + 1)
            && chunk.offset.checked_add(chunk.len).is_none_or(|end| end > next.offset)
        {
            return invalid(format!("chunks at {} and {} overlap", chunk.offset, next.offset));
        }
    }
    Ok(())
}

/// What the readers share.
struct Shared<'a, E> {
    chunks: &'a [Chunk],
    /// The next chunk to take.
    next: AtomicUsize,
    reading: AtomicUsize,
    max_reading: AtomicUsize,
    direct_bytes: AtomicU64,
    /// Set by the first error: readers take no more chunks.
    failed: AtomicBool,
    /// The error that stopped the load, not its consequences.
    first_error: Mutex<Option<E>>,
}

impl<E> Shared<'_, E> {
    fn stop(&self, error: E) {
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(error);
        }
        self.failed.store(true, Ordering::Relaxed);
    }

    /// One reader: takes chunks until none is left or the load failed, then
    /// waits for its copies and closes its lane, whatever happened.
    fn run_reader<S, R>(&self, mut own: Vec<&mut [u8]>, sink: &S, read: &R, done: mpsc::Sender<usize>)
    where
        S: Sink<Error = E>,
        R: Fn(&Chunk, &mut [u8]) -> Result<u64, E>,
        E: From<io::Error>,
    {
        let mut lane = match catch_panic(|| sink.lane()) {
            Ok(lane) => lane,
            Err(e) => return self.stop(e),
        };
        let mut in_flight: Vec<Option<S::InFlight>> = own.iter().map(|_| None).collect();
        let mut turn = 0;
        let result = catch_panic(|| {
            while !self.failed.load(Ordering::Relaxed) {
                let index = self.next.fetch_add(1, Ordering::Relaxed);
                let Some(chunk) = self.chunks.get(index) else { return Ok(()) };
                let slot = turn % own.len();
                turn += 1;
                if let Some(copy) = in_flight[slot].take() {
                    sink.wait(&mut lane, copy)?;
                }
                let view = &mut own[slot][chunk.place..chunk.place + chunk.len];
                let now = self.reading.fetch_add(1, Ordering::Relaxed) + 1;
                self.max_reading.fetch_max(now, Ordering::Relaxed);
                let read = read(chunk, view);
                self.reading.fetch_sub(1, Ordering::Relaxed);
                self.direct_bytes.fetch_add(read?, Ordering::Relaxed);
                // SAFETY: `check_plan` put the chunk inside the destination
                // and apart from every other; the slot is this reader's and
                // is next written after `wait` on this handle, which also
                // runs on every path out of here.
                in_flight[slot] = Some(unsafe { sink.copy(&mut lane, chunk.offset, view) }?);
                // The caller may have stopped listening (it only reports progress).
                let _ = done.send(chunk.len);
            }
            Ok(())
        });
        if let Err(e) = result {
            self.stop(e);
        }
        // The slots outlive no copy out of them.
        for copy in in_flight.into_iter().flatten() {
            if let Err(e) = catch_panic(|| sink.wait(&mut lane, copy)) {
                self.stop(e);
            }
        }
        if let Err(e) = catch_panic(|| sink.close(lane)) {
            self.stop(e);
        }
    }
}

/// `work()`, with a panic turned into an error: a reader that panics must
/// still wait for its copies, and stop the others.
fn catch_panic<T, E: From<io::Error>>(work: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
    catch_unwind(AssertUnwindSafe(work))
        .unwrap_or_else(|panic| Err(io::Error::other(format!("a staging reader panicked: {}", panic_message(&*panic))).into()))
}

/// What a caught panic said (its message, when it was text).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic.downcast_ref::<&str>().copied().or_else(|| panic.downcast_ref::<String>().map(String::as_str)).unwrap_or("")
}

/// [`stage`] into host memory: each chunk is copied into `dst` at its offset
/// as soon as it is read (the CPU stand-in for a device, with which the
/// scheduling is tested without one).
pub fn stage_to_host<R, P>(chunks: &[Chunk], slots: Vec<&mut [u8]>, readers: usize, dst: &mut [u8], read: R, progress: P) -> io::Result<Report>
where
    R: Fn(&Chunk, &mut [u8]) -> io::Result<u64> + Sync,
    P: FnMut(Progress) -> io::Result<()>,
{
    stage(chunks, slots, readers, &HostSink { dst: dst.as_mut_ptr(), len: dst.len(), _dst: std::marker::PhantomData }, read, progress)
}

/// Copies into host memory, from several readers at once and without a
/// lock: sound because [`stage`] refuses overlapping chunks and copies each
/// once (the contract of [`Sink::copy`]); only this module makes one.
struct HostSink<'a> {
    dst: *mut u8,
    len: usize,
    _dst: std::marker::PhantomData<&'a mut [u8]>,
}

// SAFETY: concurrent copies write disjoint ranges (see the type's doc).
unsafe impl Sync for HostSink<'_> {}

impl Sink for HostSink<'_> {
    type Lane = ();
    type InFlight = ();
    type Error = io::Error;

    fn dst_len(&self) -> usize {
        self.len
    }

    fn lane(&self) -> io::Result<()> {
        Ok(())
    }

    unsafe fn copy(&self, _: &mut (), offset: usize, src: &[u8]) -> io::Result<()> {
        debug_assert!(offset + src.len() <= self.len);
        // SAFETY: in bounds and written by no other copy (the caller's
        // contract), and `src` is a slot, not `dst`.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.dst.add(offset), src.len()) };
        Ok(())
    }

    fn wait(&self, _: &mut (), _: ()) -> io::Result<()> {
        Ok(())
    }

    fn close(&self, _: ()) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn source(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn plan(total: usize, chunk: usize, place: usize) -> Vec<Chunk> {
        (0..total).step_by(chunk).map(|offset| Chunk { offset, len: chunk.min(total - offset), place }).collect()
    }

    /// A test load: `src` cut into chunks, slots to stage them through, and a
    /// zeroed destination.
    struct Load {
        src: Vec<u8>,
        out: Vec<u8>,
        memory: Vec<Vec<u8>>,
        chunks: Vec<Chunk>,
    }

    impl Load {
        /// `total` bytes in `chunk`-byte chunks placed at `place`, through `slots` slots.
        fn new(total: usize, chunk: usize, place: usize, slots: usize) -> Load {
            Load { src: source(total), out: vec![0; total], memory: vec![vec![0; chunk + place]; slots], chunks: plan(total, chunk, place) }
        }
    }

    fn slices(memory: &mut [Vec<u8>]) -> Vec<&mut [u8]> {
        memory.iter_mut().map(Vec::as_mut_slice).collect()
    }

    fn read_from(src: &[u8]) -> impl Fn(&Chunk, &mut [u8]) -> io::Result<u64> + Sync + '_ {
        move |chunk, dst| {
            dst.copy_from_slice(&src[chunk.offset..chunk.offset + chunk.len]);
            Ok(chunk.len as u64 / 2)
        }
    }

    proptest! {
        #[test]
        fn every_byte_arrives_and_progress_ends_at_the_total(total in 0usize..20_000, chunk in 1usize..3000, slots in 1usize..6, readers in 1usize..5, place in 0usize..9) {
            let mut l = Load::new(total, chunk, place, slots);
            let mut seen = Vec::new();
            let report = stage_to_host(&l.chunks, slices(&mut l.memory), readers, &mut l.out, read_from(&l.src), |heard| {
                if let Progress::Done(done) = heard {
                    seen.push(done);
                }
                Ok(())
            }).unwrap();
            prop_assert_eq!(&l.out, &l.src);
            prop_assert_eq!(report.chunks, l.chunks.len());
            prop_assert_eq!(seen.len(), l.chunks.len());
            prop_assert!(seen.windows(2).all(|w| w[0] < w[1]));
            prop_assert_eq!(seen.last().copied().unwrap_or(0), total);
            prop_assert!(report.max_reading <= readers.min(slots));
            prop_assert_eq!(report.direct_bytes, l.chunks.iter().map(|c| c.len as u64 / 2).sum::<u64>());
        }
    }

    /// Stages 64 KiB in 256-byte chunks (`readers` readers, 4 slots), calling
    /// `before_read` with each read's number first, and expects the load to
    /// fail and stop: returns its error and the number of reads.
    fn stopped_load(
        readers: usize,
        before_read: impl Fn(usize) -> io::Result<()> + Sync,
        progress: impl FnMut(Progress) -> io::Result<()>,
    ) -> (io::Error, usize) {
        let mut l = Load::new(1 << 16, 256, 0, 4);
        let reads = AtomicUsize::new(0);
        let read = |chunk: &Chunk, dst: &mut [u8]| {
            before_read(reads.fetch_add(1, Ordering::SeqCst))?;
            read_from(&l.src)(chunk, dst)
        };
        let error = stage_to_host(&l.chunks, slices(&mut l.memory), readers, &mut l.out, read, progress).unwrap_err();
        // Not a tight bound: the other reader races on until the error is
        // recorded. Without the stop it would read all 256.
        let reads = reads.into_inner();
        assert!(reads < l.chunks.len() / 2, "readers stopped: {reads} of {} chunks read", l.chunks.len());
        (error, reads)
    }

    /// Reads after the trigger are slow, so that reading half the file
    /// would take the stop over 300 ms to arrive (room for a loaded machine).
    fn slowly() -> io::Result<()> {
        std::thread::sleep(std::time::Duration::from_millis(5));
        Ok(())
    }

    #[test]
    fn a_read_error_stops_the_readers_and_is_returned() {
        let (error, _) = stopped_load(
            2,
            |read| match read {
                3 => Err(io::Error::other("disk gone")),
                4.. => slowly(),
                _ => Ok(()),
            },
            |_| Ok(()),
        );
        assert_eq!(error.to_string(), "disk gone");
    }

    #[test]
    fn a_progress_error_stops_the_readers() {
        let heard = AtomicBool::new(false);
        // Every read but the first waits until progress has been reported:
        // otherwise the readers could finish before the first report.
        let held = |read| {
            if read == 0 {
                return Ok(());
            }
            while !heard.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
            slowly()
        };
        let progress = |_: Progress| {
            heard.store(true, Ordering::SeqCst);
            Err(io::Error::other("interrupted"))
        };
        assert_eq!(stopped_load(2, held, progress).0.to_string(), "interrupted");
    }

    #[test]
    fn a_panicking_read_is_an_error_that_stops_the_load() {
        // One reader: a panic's report (a backtrace, in tests) can take
        // longer than any slow read, so other readers' counts would vary;
        // stopping them is the read-error test's, through the same path.
        let (error, reads) = stopped_load(1, |read| if read == 2 { panic!("bad sector") } else { Ok(()) }, |_| Ok(()));
        assert_eq!(error.to_string(), "a staging reader panicked: bad sector");
        assert_eq!(reads, 3, "the reader stopped at its panic");
    }

    #[test]
    fn a_load_ticks_while_it_waits() {
        let mut l = Load::new(4096, 1024, 0, 2);
        let slow = |chunk: &Chunk, dst: &mut [u8]| {
            std::thread::sleep(crate::progress::TICK * 3);
            read_from(&l.src)(chunk, dst)
        };
        let mut ticks = 0;
        stage_to_host(&l.chunks, slices(&mut l.memory), 1, &mut l.out, slow, |heard| {
            ticks += usize::from(heard == Progress::Tick);
            Ok(())
        })
        .unwrap();
        assert!(ticks >= l.chunks.len(), "{ticks} ticks over {} reads of 150 ms", l.chunks.len());
        assert_eq!(l.out, l.src);
    }

    /// A sink whose copies finish later: checks that a slot is never read
    /// into while a copy out of it is in flight, and that every copy is
    /// waited for before the load returns.
    struct Deferred<'a> {
        out: Mutex<&'a mut [u8]>,
        waited: AtomicUsize,
        started: AtomicUsize,
    }

    impl Sink for Deferred<'_> {
        type Lane = ();
        /// The copy's source (the slot's address) and the bytes it must still hold.
        type InFlight = (usize, Vec<u8>, usize);
        type Error = io::Error;

        fn dst_len(&self) -> usize {
            self.out.lock().unwrap().len()
        }

        fn lane(&self) -> io::Result<()> {
            Ok(())
        }

        unsafe fn copy(&self, _: &mut (), offset: usize, src: &[u8]) -> io::Result<Self::InFlight> {
            self.started.fetch_add(1, Ordering::Relaxed);
            Ok((src.as_ptr() as usize, src.to_vec(), offset))
        }

        fn wait(&self, _: &mut (), (at, expected, offset): Self::InFlight) -> io::Result<()> {
            // SAFETY: the engine keeps the slot alive and unwritten until this returns.
            let now = unsafe { std::slice::from_raw_parts(at as *const u8, expected.len()) };
            assert_eq!(now, &expected[..], "the slot was overwritten before its copy completed");
            self.waited.fetch_add(1, Ordering::Relaxed);
            self.out.lock().unwrap()[offset..offset + now.len()].copy_from_slice(now);
            Ok(())
        }

        fn close(&self, _: ()) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn slots_are_reused_only_after_their_copies_complete() {
        let mut l = Load::new(50_000, 1000, 0, 3);
        let sink = Deferred { out: Mutex::new(&mut l.out), waited: AtomicUsize::new(0), started: AtomicUsize::new(0) };
        stage(&l.chunks, slices(&mut l.memory), 3, &sink, read_from(&l.src), |_| Ok(())).unwrap();
        assert_eq!(sink.started.into_inner(), l.chunks.len());
        assert_eq!(sink.waited.into_inner(), l.chunks.len());
        assert_eq!(l.out, l.src);
    }

    #[test]
    fn plans_that_do_not_fit_are_refused() {
        let mut out = vec![0u8; 100];
        let mut slot = vec![0u8; 10];
        let read = |_: &Chunk, _: &mut [u8]| Ok(0);
        let big = [Chunk { offset: 0, len: 8, place: 4 }];
        let e = stage_to_host(&big, vec![slot.as_mut_slice()], 1, &mut out, read, |_| Ok(())).unwrap_err();
        assert!(e.to_string().contains("does not fit a 10-byte slot"), "{e}");
        let overlapping = [Chunk { offset: 0, len: 8, place: 0 }, Chunk { offset: 4, len: 4, place: 0 }];
        let e = stage_to_host(&overlapping, vec![slot.as_mut_slice()], 1, &mut out, read, |_| Ok(())).unwrap_err();
        assert!(e.to_string().contains("overlap"), "{e}");
        let outside = [Chunk { offset: 96, len: 8, place: 0 }];
        let e = stage_to_host(&outside, vec![slot.as_mut_slice()], 1, &mut out, read, |_| Ok(())).unwrap_err();
        assert!(e.to_string().contains("outside the 100-byte destination"), "{e}");
    }
}
