//! Reading many byte runs, such as the rows or columns that slices of
//! tensors select, with the engine.
//!
//! A run the size of a row of a column slice can be a few KiB, and one
//! positional read each then costs more than the bytes between the runs:
//! in the engine, about 8 µs a read (262,144 reads of 2 KiB took 2.25 s
//! where the whole 1 GiB file read in about 1 s), the time the disk takes
//! for 8 to 16 KiB. So runs at most [`GATHER_GAP`] apart are read as one
//! span into a scratch buffer, in parallel like any other range, and copied
//! to their places from there; runs that stand alone are read straight into
//! place.

use std::fs::File;
use std::io;
use std::ops::Range;

use crate::{DIRECT_ALIGN, DirectIo, EngineOptions, Progress, ReadRange, Stats, invalid, prefers_direct, read_into};

/// Runs at most this many bytes apart in the file are read as one span.
pub const GATHER_GAP: usize = 16 << 10;

/// Spans are read in batches of about this many bytes (the scratch buffer).
const SCRATCH_BYTES: usize = 64 << 20;

/// Runs read as one span: `len` bytes at `file_offset`, holding `runs`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Span {
    file_offset: u64,
    len: usize,
    runs: Range<usize>,
}

/// Reads every run into `dst` as [`read_into`] does (runs inside `dst`, not
/// overlapping there: checked), reading runs at most [`GATHER_GAP`] apart
/// in the file, in the order given, as one span of at most
/// `options.chunk_bytes` and copying them out of it. `progress` hears the
/// bytes read, the spans' gaps included. Returns the statistics of all reads.
pub fn read_runs_into(
    file: &File,
    runs: &[ReadRange],
    dst: &mut [u8],
    options: &EngineOptions,
    mut progress: impl FnMut(Progress) -> io::Result<()>,
) -> io::Result<Stats> {
    check_destinations(runs, dst.len())?;
    let (alone, spans) = group(runs, GATHER_GAP, options.chunk_bytes);
    // Decided once for the whole read, not per batch (a batch alone is too
    // small for `Auto` to go direct).
    let mut options = *options;
    if options.direct == DirectIo::Auto {
        let first = runs.iter().map(|r| r.file_offset).min().unwrap_or(0);
        let bytes = alone.iter().map(|r| r.len).sum::<usize>() + spans.iter().map(|s| s.len).sum::<usize>();
        options.direct = if prefers_direct(file, first, bytes) { DirectIo::Always } else { DirectIo::Never };
    }
    let options = &options;
    let mut before = 0;
    let mut total = Stats::default();
    let mut add = |stats: Stats, before: &mut usize| {
        *before += stats.bytes as usize;
        total.bytes += stats.bytes;
        total.reads += stats.reads;
        total.peak_in_flight = total.peak_in_flight.max(stats.peak_in_flight);
        total.direct_bytes += stats.direct_bytes;
    };
    let stats = read_into(file, &alone, dst, options, shifted(&mut progress, before))?;
    add(stats, &mut before);
    let batches = batches(&spans);
    let Some(largest) = batches.iter().map(|(_, _, len)| *len).max() else { return Ok(total) };
    // Page-aligned, so that a span placed like the file can be read directly.
    let mut memory = vec![0u8; largest + DIRECT_ALIGN];
    let shift = memory.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
    let scratch = &mut memory[shift..shift + largest];
    for (batch, places, len) in batches {
        let reads: Vec<ReadRange> =
            spans[batch.clone()].iter().zip(&places).map(|(span, &at)| ReadRange { file_offset: span.file_offset, dst_offset: at, len: span.len }).collect();
        let stats = read_into(file, &reads, &mut scratch[..len], options, shifted(&mut progress, before))?;
        add(stats, &mut before);
        for (span, &at) in spans[batch].iter().zip(&places) {
            for run in &runs[span.runs.clone()] {
                let from = at + (run.file_offset - span.file_offset) as usize;
                dst[run.dst_offset..run.dst_offset + run.len].copy_from_slice(&scratch[from..from + run.len]);
            }
        }
    }
    Ok(total)
}

/// `progress` with `before` bytes added to what it hears.
fn shifted(progress: &mut impl FnMut(Progress) -> io::Result<()>, before: usize) -> impl FnMut(Progress) -> io::Result<()> + '_ {
    move |heard| match heard {
        Progress::Done(done) => progress(Progress::Done(before + done)),
        tick => progress(tick),
    }
}

/// Checks that every run lies inside a destination of `len` bytes and that
/// no two overlap there.
fn check_destinations(runs: &[ReadRange], len: usize) -> io::Result<()> {
    let mut places: Vec<(usize, usize)> = runs.iter().filter(|r| r.len > 0).map(|r| (r.dst_offset, r.len)).collect();
    places.sort_unstable();
    let mut free_from = 0;
    for (at, run) in places {
        if at < free_from {
            return Err(invalid("ranges overlap in the destination"));
        }
        free_from = at.checked_add(run).filter(|end| *end <= len).ok_or_else(|| invalid("a range ends past the destination buffer"))?;
    }
    Ok(())
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
        let run_end = run.file_offset + run.len as u64;
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

/// Consecutive spans in batches of about [`SCRATCH_BYTES`]: each batch's
/// spans, their places in the scratch buffer (each at the same offset
/// within a page as in the file) and the bytes the batch takes there.
fn batches(spans: &[Span]) -> Vec<(Range<usize>, Vec<usize>, usize)> {
    let mut out = Vec::new();
    let (mut first, mut places, mut used) = (0, Vec::new(), 0usize);
    for (i, span) in spans.iter().enumerate() {
        if !places.is_empty() && used + span.len > SCRATCH_BYTES {
            out.push((first..i, std::mem::take(&mut places), used));
            (first, used) = (i, 0);
        }
        let at = used + (span.file_offset as usize).wrapping_sub(used) % DIRECT_ALIGN;
        places.push(at);
        used = at + span.len;
    }
    if !places.is_empty() {
        out.push((first..spans.len(), places, used));
    }
    out
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
    fn spans_sit_in_the_scratch_buffer_like_in_the_file_and_batches_stay_bounded() {
        let spans: Vec<Span> = (0..40).map(|i| Span { file_offset: i * (5 << 20) + 123, len: 3 << 20, runs: 0..2 }).collect();
        let batches = batches(&spans);
        assert!(batches.len() > 1);
        let mut next = 0;
        for (range, places, len) in &batches {
            assert_eq!(range.start, next);
            next = range.end;
            assert!(*len <= SCRATCH_BYTES + (3 << 20) + DIRECT_ALIGN, "{len}");
            for (span, at) in spans[range.clone()].iter().zip(places) {
                assert_eq!(*at as u64 % DIRECT_ALIGN as u64, span.file_offset % DIRECT_ALIGN as u64);
                assert!(at + span.len <= *len);
            }
        }
        assert_eq!(next, spans.len());
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
