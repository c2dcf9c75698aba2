//! Reading many byte runs, such as the rows or columns that slices of
//! tensors select, with the engine.
//!
//! A run the size of a row of a column slice can be a few KiB, and one
//! positional read each then costs more than the bytes between the runs:
//! in the engine, about 8 µs a read (a rank's column half of a 1 GiB file,
//! 262,144 reads of 2 KiB, took 2.25 s, longer than reading the whole
//! file), the time the disk takes for 8 to 16 KiB. So runs at most [`GATHER_GAP`] apart are read as one
//! span into the reader's scratch buffer and copied to their places from
//! there, by the reader that read it; runs that stand alone are read
//! straight into place. Both kinds of read share one pool of readers.

use std::fs::File;
use std::io;
use std::ops::Range;

use crate::{Destination, EngineOptions, Job, Progress, ReadRange, Stats, carve, chunk_places, chunk_size, coalesce, direct_handle, execute};

/// Runs at most this many bytes apart in the file are read as one span.
pub const GATHER_GAP: usize = 16 << 10;

/// Runs read as one span: `len` bytes at `file_offset`, holding `runs`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Span {
    file_offset: u64,
    len: usize,
    runs: Range<usize>,
}

/// What a piece of the destination is for.
enum Owner {
    /// A read of its own, at this file offset.
    Place(u64),
    /// A run of span `span`, `at` bytes into it.
    Run { span: usize, at: usize },
}

/// Reads every run into `dst` as [`crate::read_into`] does (runs inside
/// `dst`, not overlapping there: checked), except that runs at most
/// [`GATHER_GAP`] apart in the file, in the order given, are read as one
/// span of at most `options.chunk_bytes` and copied out of it. `progress`
/// and the statistics count the bytes delivered (not the spans' gaps).
pub fn read_runs_into(
    file: &File,
    runs: &[ReadRange],
    dst: &mut [u8],
    options: &EngineOptions,
    progress: impl FnMut(Progress) -> io::Result<()>,
) -> io::Result<Stats> {
    read_grouped(file, runs, Some(GATHER_GAP), dst, options, progress)
}

/// [`read_runs_into`] with runs at most `gap` apart read as spans, or with
/// none (`None`: [`crate::read_into`]); runs read alone are coalesced.
pub(crate) fn read_grouped(
    file: &File,
    runs: &[ReadRange],
    gap: Option<usize>,
    dst: &mut [u8],
    options: &EngineOptions,
    progress: impl FnMut(Progress) -> io::Result<()>,
) -> io::Result<Stats> {
    let chunk = chunk_size(options);
    let (alone, spans) = match gap {
        Some(gap) => group(runs, gap, chunk),
        None => (runs.to_vec(), Vec::new()),
    };
    let alone = coalesce(alone);
    let bytes = alone.iter().map(|r| r.len).sum::<usize>() + spans.iter().map(|s| s.len).sum::<usize>();
    let first = alone.iter().map(|r| r.file_offset).chain(spans.iter().map(|s| s.file_offset)).min();
    let direct_file = direct_handle(file, options.direct, first, bytes);
    let mut places: Vec<(usize, usize, Owner)> =
        chunk_places(&alone, chunk, direct_file.is_some()).into_iter().map(|(at, len, file_offset)| (at, len, Owner::Place(file_offset))).collect();
    for (index, span) in spans.iter().enumerate() {
        for run in &runs[span.runs.clone()] {
            places.push((run.dst_offset, run.len, Owner::Run { span: index, at: (run.file_offset - span.file_offset) as usize }));
        }
    }
    let mut jobs = Vec::new();
    let mut span_runs: Vec<Vec<(usize, &mut [u8])>> = spans.iter().map(|_| Vec::new()).collect();
    for (owner, piece) in carve(dst, places)? {
        match owner {
            Owner::Place(file_offset) => jobs.push(Job { file_offset, into: Destination::Place(piece) }),
            Owner::Run { span, at } => span_runs[span].push((at, piece)),
        }
    }
    for (span, runs) in spans.iter().zip(span_runs) {
        jobs.push(Job { file_offset: span.file_offset, into: Destination::Scatter { len: span.len, runs } });
    }
    execute(file, jobs, direct_file.as_ref(), options, progress)
}

/// Splits `runs` into those read alone and spans of several runs, each run
/// following the previous one in the file by at most `gap` bytes, a span at
/// most `max_span` bytes long.
fn group(runs: &[ReadRange], gap: usize, max_span: usize) -> (Vec<ReadRange>, Vec<Span>) {
    let (mut alone, mut spans) = (Vec::new(), Vec::new());
    let mut close = |first: usize, end: usize, span_end: u64| {
        if end - first == 1 {
            alone.push(runs[first]);
        } else {
            let file_offset = runs[first].file_offset;
            spans.push(Span { file_offset, len: (span_end - file_offset) as usize, runs: first..end });
        }
    };
    let mut first = 0;
    let mut span_end = 0u64;
    for (i, run) in runs.iter().enumerate() {
        // Saturating: a run past the end of u64 cannot be read, and its read says so.
        let run_end = run.file_offset.saturating_add(run.len as u64);
        let joins = i > first
            && run.file_offset >= span_end
            && run.file_offset - span_end <= gap as u64
            && run_end - runs[first].file_offset <= max_span as u64;
        if i > first && !joins {
            close(first, i, span_end);
            first = i;
        }
        span_end = if i == first { run_end } else { span_end.max(run_end) };
    }
    if !runs.is_empty() {
        close(first, runs.len(), span_end);
    }
    (alone, spans)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use proptest::prelude::*;

    use super::*;

    fn run(file_offset: u64, dst_offset: usize, len: usize) -> ReadRange {
        ReadRange { file_offset, dst_offset, len }
    }

    #[test]
    fn close_runs_share_a_span_and_far_ones_stand_alone() {
        // Two rows of a column slice 4 KiB apart, then one 100 KiB further.
        let runs = [run(0, 0, 100), run(4196, 100, 100), run(4196 + 100 + 100_000, 200, 50)];
        let (alone, spans) = group(&runs, GATHER_GAP, 8 << 20);
        assert_eq!(spans, vec![Span { file_offset: 0, len: 4296, runs: 0..2 }]);
        assert_eq!(alone, vec![runs[2]]);
        // A span stops before it grows past the largest read.
        let (alone, spans) = group(&runs[..2], GATHER_GAP, 4200);
        assert_eq!((alone, spans), (runs[..2].to_vec(), vec![]));
    }

    #[test]
    fn the_rows_of_a_column_slice_take_one_read_per_span() {
        let bytes: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&bytes).unwrap();
        // 1024 rows of 1 KiB, the first 100 bytes of each: one span of 1 MiB
        // with 4 KiB reads at most, 256 with a chunk of one page.
        let runs: Vec<ReadRange> = (0..1024).map(|row| run(row * 1024, row as usize * 100, 100)).collect();
        let mut dst = vec![0u8; 102_400];
        for (chunk, reads) in [(8 << 20, 1), (4096, 256)] {
            let options = EngineOptions { threads: 2, chunk_bytes: chunk, direct: crate::DirectIo::Never };
            let stats = read_runs_into(&file, &runs, &mut dst, &options, |_| Ok(())).unwrap();
            assert_eq!((stats.reads, stats.bytes), (reads, 102_400));
            assert!(stats.peak_in_flight <= 2 * chunk as u64);
            for (k, r) in runs.iter().enumerate() {
                assert_eq!(&dst[k * 100..k * 100 + 100], &bytes[r.file_offset as usize..r.file_offset as usize + 100]);
            }
        }
    }

    #[test]
    fn bad_destinations_are_refused() {
        let file = tempfile::tempfile().unwrap();
        let mut dst = [0u8; 10];
        let quiet = |_: Progress| Ok(());
        let overlap = read_runs_into(&file, &[run(0, 0, 4), run(8, 2, 4)], &mut dst, &EngineOptions::default(), quiet).unwrap_err();
        assert!(overlap.to_string().contains("overlap"), "{overlap}");
        let past = read_runs_into(&file, &[run(0, 8, 4)], &mut dst, &EngineOptions::default(), quiet).unwrap_err();
        assert!(past.to_string().contains("past the destination"), "{past}");
        // An empty run inside a span, placed past the end: refused too, not a panic.
        let empty = read_runs_into(&file, &[run(0, 0, 4), run(8, 20, 0), run(12, 4, 4)], &mut dst, &EngineOptions::default(), quiet).unwrap_err();
        assert!(empty.to_string().contains("past the destination"), "{empty}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the runs (strided like slices, in file order or not),
        /// every byte lands where a plain read would put it, and the
        /// progress ends at the bytes read.
        #[test]
        fn runs_land_where_planned(
            rows in 1usize..300, row in 1usize..40_000, take in 1usize..40_000, skip in 0usize..3, reversed: bool, chunk in 1usize..64,
        ) {
            let take = take.min(row);
            let len = rows * row;
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ (i / 251) as u8).collect();
            let mut file = tempfile::tempfile().unwrap();
            file.write_all(&bytes).unwrap();
            let mut runs: Vec<ReadRange> = (0..rows).step_by(skip + 1).enumerate().map(|(k, r)| run((r * row) as u64, k * take, take)).collect();
            if reversed {
                runs.reverse();
            }
            let mut dst = vec![0u8; runs.len() * take];
            let options = EngineOptions { threads: 3, chunk_bytes: chunk << 12, direct: crate::DirectIo::Never };
            let mut last = 0;
            let stats = read_runs_into(&file, &runs, &mut dst, &options, |p| {
                if let Progress::Done(done) = p {
                    last = done;
                }
                Ok(())
            }).unwrap();
            prop_assert_eq!(last as u64, stats.bytes);
            for r in &runs {
                let at = r.file_offset as usize;
                prop_assert_eq!(&dst[r.dst_offset..r.dst_offset + r.len], &bytes[at..at + r.len]);
            }
        }
    }
}
