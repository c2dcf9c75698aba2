//! The tensafe I/O engine: executes a plan of byte ranges (file → destination
//! buffer) with a bounded pool of threads doing positional reads.
//!
//! * Adjacent ranges are coalesced into large reads, then split into chunks of
//!   at most [`EngineOptions::chunk_bytes`].
//! * At most [`EngineOptions::threads`] reads are in flight, each straight into
//!   its final place in the destination: no staging copy, and bytes in flight
//!   never exceed `threads × chunk_bytes`.
//! * [`evict`] drops a file's pages from the page cache after a load, so a
//!   model is not held twice in RAM (once in the cache, once in the tensors).

use std::fs::File;
use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

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

/// Bounds of the engine.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Reader threads (at least 1).
    pub threads: usize,
    /// Largest single read, in bytes.
    pub chunk_bytes: usize,
}

impl Default for EngineOptions {
    /// Measured on the 2-core development machines: 4 threads and 8 MiB reads
    /// reach the disk's bandwidth cold and the memory bandwidth warm (see
    /// `bench/load_bench.py`). More threads help on machines with more cores
    /// and NVMe queues; the Python API exposes both knobs.
    fn default() -> Self {
        EngineOptions { threads: 4, chunk_bytes: 8 << 20 }
    }
}

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
    /// Bytes read.
    pub bytes: u64,
    /// Read calls made.
    pub reads: u64,
    /// Largest number of bytes being read at one moment.
    pub peak_in_flight: u64,
}

/// Reads every range into `dst` with a pool of threads.
///
/// Ranges must lie inside `dst` and must not overlap there (checked: an error,
/// not a panic). `progress` is called with the running total of bytes read,
/// from the reader threads.
pub fn read_into(
    file: &File,
    ranges: &[ReadRange],
    dst: &mut [u8],
    options: &EngineOptions,
    progress: Option<&(dyn Fn(u64) + Sync)>,
) -> io::Result<Stats> {
    let chunk = options.chunk_bytes.max(4096);
    // Split into chunks and sort by destination so `dst` can be carved into
    // disjoint mutable slices without unsafe code.
    let mut jobs: Vec<ReadRange> = Vec::new();
    for r in coalesce(ranges.to_vec()) {
        let mut done = 0;
        while done < r.len {
            let len = chunk.min(r.len - done);
            jobs.push(ReadRange { file_offset: r.file_offset + done as u64, dst_offset: r.dst_offset + done, len });
            done += len;
        }
    }
    jobs.sort_by_key(|j| j.dst_offset);
    let mut slices: Vec<(u64, &mut [u8])> = Vec::with_capacity(jobs.len());
    let mut rest: &mut [u8] = dst;
    let mut consumed = 0usize;
    for job in &jobs {
        let skip = job.dst_offset.checked_sub(consumed).ok_or_else(|| invalid("ranges overlap in the destination"))?;
        if skip + job.len > rest.len() {
            return Err(invalid("a range ends past the destination buffer"));
        }
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(skip);
        let (piece, tail) = tail.split_at_mut(job.len);
        slices.push((job.file_offset, piece));
        rest = tail;
        consumed = job.dst_offset + job.len;
    }
    // Largest jobs last: popping from the end starts them first.
    slices.sort_by_key(|(_, piece)| piece.len());

    let queue = Mutex::new(slices);
    let total = AtomicU64::new(0);
    let reads = AtomicU64::new(0);
    let in_flight = AtomicU64::new(0);
    let peak = AtomicU64::new(0);
    let threads = options.threads.max(1).min(jobs.len().max(1));
    let result: io::Result<()> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> io::Result<()> {
                    loop {
                        let Some((offset, piece)) = queue.lock().expect("queue lock").pop() else { return Ok(()) };
                        let len = piece.len() as u64;
                        let now = in_flight.fetch_add(len, Ordering::SeqCst) + len;
                        peak.fetch_max(now, Ordering::SeqCst);
                        let read = read_exact_at(file, piece, offset);
                        in_flight.fetch_sub(len, Ordering::SeqCst);
                        read?;
                        reads.fetch_add(1, Ordering::Relaxed);
                        let done = total.fetch_add(len, Ordering::SeqCst) + len;
                        if let Some(progress) = progress {
                            progress(done);
                        }
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| w.join().expect("reader thread panicked"))
    });
    result?;
    Ok(Stats { bytes: total.into_inner(), reads: reads.into_inner(), peak_in_flight: peak.into_inner() })
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
        assert!(read_into(&f, &[r(0, 0, 8), r(32, 4, 8)], &mut dst, &EngineOptions::default(), None).is_err());
        assert!(read_into(&f, &[r(0, 10, 8)], &mut dst, &EngineOptions::default(), None).is_err());
        // Past the end of the file: an error, not a short read.
        assert!(read_into(&f, &[r(60, 0, 8)], &mut dst, &EngineOptions::default(), None).is_err());
    }

    #[test]
    fn bytes_in_flight_stay_within_the_budget() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7) as u8).collect();
        let f = file_with(&data);
        let mut dst = vec![0u8; data.len()];
        let options = EngineOptions { threads: 3, chunk_bytes: 4096 };
        let seen = AtomicU64::new(0);
        let stats = read_into(&f, &[ReadRange { file_offset: 0, dst_offset: 0, len: data.len() }], &mut dst, &options, Some(&|n| {
            seen.fetch_max(n, Ordering::SeqCst);
        }))
        .unwrap();
        assert_eq!(dst, data);
        assert!(stats.peak_in_flight <= 3 * 4096, "{stats:?}");
        assert_eq!(stats.reads, (data.len() as u64).div_ceil(4096));
        assert_eq!(seen.into_inner(), data.len() as u64);
    }

    proptest! {
        #[test]
        fn scattered_ranges_land_where_planned(
            pieces in prop::collection::vec((0usize..5000, 0usize..300), 0..40),
            threads in 1usize..6,
            chunk in 1usize..3,
        ) {
            let data: Vec<u8> = (0..5300u32).map(|i| (i % 251) as u8).collect();
            let f = file_with(&data);
            // Give each piece its own place in the destination, in shuffled order.
            let mut ranges = Vec::new();
            let mut at = 0;
            for (offset, len) in pieces.iter().rev() {
                ranges.push(ReadRange { file_offset: *offset as u64, dst_offset: at, len: *len });
                at += len;
            }
            let mut dst = vec![0u8; at];
            read_into(&f, &ranges, &mut dst, &EngineOptions { threads, chunk_bytes: chunk * 4096 }, None).unwrap();
            for r in &ranges {
                prop_assert_eq!(&dst[r.dst_offset..r.dst_offset + r.len], &data[r.file_offset as usize..r.file_offset as usize + r.len]);
            }
        }
    }
}
