//! numpy-style selections of a tensor, planned as byte ranges.
//!
//! A [`SlicePlan`] turns indices into the output shape and the runs of bytes to
//! read from the tensor, in output order. The same plan drives copies out of a
//! mapping, positional reads, and (later) range requests to object storage.
//!
//! Semantics follow numpy basic indexing: integers (negative counts from the
//! end, out of range is an error), ranges with a positive step whose bounds
//! may be negative and are clamped to the dimension, one ellipsis, and new
//! axes. Negative steps are not supported.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::Dtype;

/// One item of an index expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceIndex {
    /// Selects one position and drops the dimension (`x[i]`).
    Index(i64),
    /// `start:stop:step`; `None` means the default bound, `step` must be positive.
    Range { start: Option<i64>, stop: Option<i64>, step: Option<i64> },
    /// `...`: as many full ranges as needed to index every dimension.
    Ellipsis,
    /// `None` / `np.newaxis`: inserts a dimension of size 1 in the output.
    NewAxis,
}

impl SliceIndex {
    /// The full range `:`.
    pub const FULL: SliceIndex = SliceIndex::Range { start: None, stop: None, step: None };

    /// `start..stop` with step 1.
    pub fn range(start: i64, stop: i64) -> SliceIndex {
        SliceIndex::Range { start: Some(start), stop: Some(stop), step: None }
    }
}

/// The selection of one input dimension, in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DimSelection {
    start: usize,
    step: usize,
    count: usize,
    size: usize,
}

impl DimSelection {
    fn is_full(&self) -> bool {
        self.start == 0 && self.count == self.size && (self.step == 1 || self.count <= 1)
    }
}

/// The output shape of a selection and the byte runs that produce it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePlan {
    shape: Vec<usize>,
    byte_len: usize,
    /// Byte offset of the first run within the tensor.
    base: usize,
    /// Length of every run in bytes.
    run: usize,
    /// Outer loops, outermost first: (count, byte stride between iterations).
    loops: Vec<(usize, usize)>,
}

impl SlicePlan {
    /// Plans `indices` on a tensor of `dtype` and `shape`.
    pub fn new(dtype: Dtype, shape: &[usize], indices: &[SliceIndex]) -> Result<SlicePlan> {
        let (dims, out_shape) = select(shape, indices)?;
        let overflow = || Error::Overflow { name: "<slice>".into(), shape: shape.to_vec() };

        let out_elements = dims.iter().try_fold(1usize, |a, d| a.checked_mul(d.count)).ok_or_else(overflow)?;
        let byte_len = dtype.byte_len(out_elements).ok_or(Error::Misaligned { name: None })?;
        if out_elements == 0 {
            // Before the strides: those of a tensor with no elements (a
            // dimension of 0 beside others) may not fit in a usize.
            return Ok(SlicePlan { shape: out_shape, byte_len: 0, base: 0, run: 0, loops: Vec::new() });
        }

        // Element strides of the input, row-major.
        let mut strides = vec![0usize; shape.len()];
        let mut acc = 1usize;
        for (k, &size) in shape.iter().enumerate().rev() {
            strides[k] = acc;
            acc = acc.checked_mul(size).ok_or_else(overflow)?;
        }

        // The innermost dimensions taken whole form one contiguous block; the
        // next one out extends it when its step is 1.
        let mut split = dims.len();
        let mut run_elements = 1usize;
        while split > 0 && dims[split - 1].is_full() {
            split -= 1;
            run_elements *= dims[split].count;
        }
        if split > 0 && (dims[split - 1].step == 1 || dims[split - 1].count == 1) {
            split -= 1;
            run_elements *= dims[split].count;
        }
        let base_elements: usize = dims.iter().zip(&strides).map(|(d, s)| d.start * s).sum();
        let to_bytes = |elements: usize| -> Result<usize> {
            elements
                .checked_mul(dtype.bits())
                .filter(|bits| bits % 8 == 0)
                .map(|bits| bits / 8)
                .ok_or(Error::Misaligned { name: None })
        };
        let mut loops = Vec::new();
        for (d, &stride) in dims[..split].iter().zip(&strides) {
            if d.count > 1 {
                loops.push((d.count, to_bytes(d.step * stride)?));
            }
        }
        Ok(SlicePlan { shape: out_shape, byte_len, base: to_bytes(base_elements)?, run: to_bytes(run_elements)?, loops })
    }

    /// Shape of the selection (after dropping indexed and adding new axes).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Total bytes selected.
    pub fn byte_len(&self) -> usize {
        self.byte_len
    }

    /// Number of byte runs [`SlicePlan::ranges`] yields.
    pub fn num_ranges(&self) -> usize {
        if self.byte_len == 0 { 0 } else { self.loops.iter().map(|(count, _)| count).product() }
    }

    /// Byte ranges relative to the tensor's first byte, in output order.
    /// Computed on the fly: memory use does not grow with the number of runs.
    pub fn ranges(&self) -> ByteRanges<'_> {
        ByteRanges { plan: self, position: vec![0; self.loops.len()], done: self.byte_len == 0 }
    }

    /// The bytes of the tensor from the start of the first run to the end of
    /// the last (empty for an empty selection).
    pub fn span(&self) -> Range<usize> {
        if self.byte_len == 0 {
            return 0..0;
        }
        let last = self.base + self.loops.iter().map(|(count, stride)| (count - 1) * stride).sum::<usize>();
        self.base..last + self.run
    }

    /// Whether a reader should read the [`SlicePlan::span`] and copy the runs
    /// out of it ([`SlicePlan::copy_from_span`]) rather than read each run:
    /// for runs under 1 KiB on average (a read, or a range in a request,
    /// costs about ten times a copy of its bytes) that fill at least half of
    /// the span, or span at most 64 MiB, so that the span's buffer holds at
    /// most the larger of twice the selection and 64 MiB.
    pub fn reads_as_span(&self) -> bool {
        const SMALL_RUN: usize = 1 << 10;
        const SMALL_SPAN: usize = 64 << 20;
        let span = self.span().len();
        self.byte_len < SMALL_RUN.saturating_mul(self.num_ranges()) && (span / 2 <= self.byte_len || span <= SMALL_SPAN)
    }

    /// The largest number of bytes between two consecutive runs (0 for one
    /// run): what a reader that merges runs across gaps must bridge to read
    /// the span as one.
    pub fn largest_gap(&self) -> usize {
        // Advancing loop k by one (those inside it back at their start)
        // jumps its stride from the start of the last run inside it.
        let mut inner_extent = self.run;
        let mut largest = 0;
        for &(count, stride) in self.loops.iter().rev() {
            if count > 1 {
                largest = largest.max(stride - inner_extent);
            }
            inner_extent += (count - 1) * stride;
        }
        if self.byte_len == 0 { 0 } else { largest }
    }

    /// The runs, at most `size` at a time (a list of every run can take
    /// gigabytes: a column of a tall tensor has one per row). Each batch
    /// comes with the part of the output it fills and its runs as (offset
    /// in the tensor, offset in that part, length).
    pub fn batches(&self, size: usize) -> impl Iterator<Item = (Range<usize>, Vec<(usize, usize, usize)>)> + '_ {
        let mut runs = self.ranges();
        let mut written = 0;
        std::iter::from_fn(move || {
            let start = written;
            let batch: Vec<_> = runs
                .by_ref()
                .take(size.max(1))
                .map(|run| {
                    let at = written - start;
                    written += run.len();
                    (run.start, at, run.len())
                })
                .collect();
            (!batch.is_empty()).then_some((start..written, batch))
        })
    }

    /// Copies the selection out of `tensor` (the whole tensor's bytes) into `dst`.
    pub fn copy_into(&self, tensor: &[u8], dst: &mut [u8]) -> Result<()> {
        let span = self.span();
        let bytes = tensor.get(span.clone()).ok_or(Error::BufferSize { expected: span.end as u64, actual: tensor.len() as u64 })?;
        self.copy_from_span(bytes, dst)
    }

    /// Copies the selection out of `span`, the tensor's bytes of
    /// [`SlicePlan::span`], into `dst`.
    pub fn copy_from_span(&self, span: &[u8], dst: &mut [u8]) -> Result<()> {
        if dst.len() != self.byte_len {
            return Err(Error::BufferSize { expected: self.byte_len as u64, actual: dst.len() as u64 });
        }
        let start = self.span().start;
        let mut written = 0;
        for range in self.ranges() {
            let (from, to) = (range.start - start, range.end - start);
            let src = span.get(from..to).ok_or(Error::BufferSize { expected: to as u64, actual: span.len() as u64 })?;
            dst[written..written + src.len()].copy_from_slice(src);
            written += src.len();
        }
        Ok(())
    }
}

/// Iterator over the byte runs of a [`SlicePlan`].
#[derive(Debug, Clone)]
pub struct ByteRanges<'a> {
    plan: &'a SlicePlan,
    position: Vec<usize>,
    done: bool,
}

impl Iterator for ByteRanges<'_> {
    type Item = Range<usize>;

    fn next(&mut self) -> Option<Range<usize>> {
        if self.done {
            return None;
        }
        let loops = &self.plan.loops;
        let start = self.plan.base + self.position.iter().zip(loops).map(|(i, (_, stride))| i * stride).sum::<usize>();
        // Advance the odometer, innermost loop first.
        self.done = true;
        for k in (0..loops.len()).rev() {
            self.position[k] += 1;
            if self.position[k] < loops[k].0 {
                self.done = false;
                break;
            }
            self.position[k] = 0;
        }
        Some(start..start + self.plan.run)
    }
}

/// Resolves indices against `shape`: the selection of every input dimension and
/// the output shape.
fn select(shape: &[usize], indices: &[SliceIndex]) -> Result<(Vec<DimSelection>, Vec<usize>)> {
    let ellipses = indices.iter().filter(|i| matches!(i, SliceIndex::Ellipsis)).count();
    if ellipses > 1 {
        return Err(Error::SeveralEllipses);
    }
    let consuming = indices.iter().filter(|i| matches!(i, SliceIndex::Index(_) | SliceIndex::Range { .. })).count();
    if consuming > shape.len() {
        return Err(Error::TooManyIndices { given: consuming, shape: shape.to_vec() });
    }

    let mut dims = Vec::with_capacity(shape.len());
    let mut out_shape = Vec::with_capacity(shape.len() + indices.len());
    let full = |size: usize| DimSelection { start: 0, step: 1, count: size, size };
    for index in indices {
        let k = dims.len();
        match *index {
            SliceIndex::NewAxis => out_shape.push(1),
            SliceIndex::Ellipsis => {
                for &size in &shape[k..k + shape.len() - consuming] {
                    dims.push(full(size));
                    out_shape.push(size);
                }
            }
            SliceIndex::Index(i) => {
                let size = shape[k];
                // In i128: a dimension of a tensor with no elements may be
                // past i64::MAX.
                let resolved = if i < 0 { i128::from(i) + size as i128 } else { i128::from(i) };
                if !(0..size as i128).contains(&resolved) {
                    return Err(Error::SliceOutOfBounds { asked: i, dim: k, size });
                }
                dims.push(DimSelection { start: resolved as usize, step: 1, count: 1, size })
            }
            SliceIndex::Range { start, stop, step } => {
                let size = shape[k];
                let step = step.unwrap_or(1);
                if step <= 0 {
                    return Err(Error::InvalidSlice {
                        reason: format!("Slice step must be a positive integer, got {step} (dimension #{k})"),
                    });
                }
                let clamp = |bound: Option<i64>, default: usize| -> usize {
                    match bound {
                        None => default,
                        Some(b) if b < 0 => (size as i128 + i128::from(b)).max(0) as usize,
                        Some(b) => (b as u64).min(size as u64) as usize,
                    }
                };
                let (start, stop) = (clamp(start, 0), clamp(stop, size));
                let count = if stop > start { (stop - start).div_ceil(step as usize) } else { 0 };
                dims.push(DimSelection { start: if count == 0 { 0 } else { start }, step: step as usize, count, size });
                out_shape.push(count);
            }
        }
    }
    for &size in &shape[dims.len()..] {
        dims.push(full(size));
        out_shape.push(size);
    }
    Ok((dims, out_shape))
}

#[cfg(test)]
mod tests {
    use super::*;
    use SliceIndex::{Ellipsis, Index, NewAxis};
    const FULL: SliceIndex = SliceIndex::FULL;

    #[test]
    fn dimensions_past_i64_max_index_from_the_end() {
        // Only a tensor with no elements can have one; a header may declare it.
        let huge = (1usize << 63) + 5;
        let last = SlicePlan::new(Dtype::F32, &[huge, 0], &[Index(-1)]).unwrap();
        assert_eq!(last.shape(), [0]);
        let tail = SliceIndex::Range { start: Some(-2), stop: None, step: None };
        assert_eq!(SlicePlan::new(Dtype::F32, &[huge, 0], &[tail]).unwrap().shape(), [2, 0]);
        // As in numpy: a stop of i64::MAX is short of this dimension's end.
        assert_eq!(SlicePlan::new(Dtype::F32, &[huge, 0], &[SliceIndex::range(-2, i64::MAX)]).unwrap().shape(), [0, 0]);
        assert!(SlicePlan::new(Dtype::F32, &[huge, 0], &[Index(i64::MIN)]).is_ok(), "within a dimension this long");
        assert!(matches!(SlicePlan::new(Dtype::F32, &[3, 0], &[Index(-4)]), Err(Error::SliceOutOfBounds { .. })));
    }

    /// Reference semantics: gather element indices one by one.
    fn naive(shape: &[usize], dims: &[DimSelection]) -> Vec<usize> {
        let mut out = vec![];
        let total: usize = dims.iter().map(|d| d.count).product();
        for flat in 0..total {
            let mut rem = flat;
            let mut offset = 0;
            let mut stride = 1;
            for k in (0..shape.len()).rev() {
                let i = rem % dims[k].count;
                rem /= dims[k].count;
                offset += (dims[k].start + i * dims[k].step) * stride;
                stride *= shape[k];
            }
            out.push(offset);
        }
        out
    }

    fn gathered(shape: &[usize], indices: &[SliceIndex]) -> (Vec<usize>, Vec<usize>) {
        let plan = SlicePlan::new(Dtype::U8, shape, indices).unwrap();
        let total: usize = shape.iter().product();
        let src: Vec<u8> = (0..total).map(|i| i as u8).collect();
        let mut dst = vec![0u8; plan.byte_len()];
        plan.copy_into(&src, &mut dst).unwrap();
        (plan.shape().to_vec(), dst.into_iter().map(usize::from).collect())
    }

    #[test]
    fn matches_naive_gather() {
        let shape = [4, 5, 6];
        let cases: Vec<Vec<SliceIndex>> = vec![
            vec![],
            vec![Index(1)],
            vec![Index(-1), FULL, Index(2)],
            vec![SliceIndex::Range { start: Some(1), stop: None, step: Some(2) }],
            vec![Ellipsis, SliceIndex::Range { start: Some(-4), stop: Some(-1), step: Some(2) }],
            vec![FULL, SliceIndex::Range { start: Some(1), stop: Some(100), step: Some(3) }, Index(0)],
            vec![SliceIndex::Range { start: Some(3), stop: Some(1), step: None }],
            vec![NewAxis, Index(2), Ellipsis, NewAxis],
        ];
        for idx in cases {
            let (dims, _) = select(&shape, &idx).unwrap();
            let (_, got) = gathered(&shape, &idx);
            assert_eq!(got, naive(&shape, &dims), "{idx:?}");
        }
    }

    #[test]
    fn shapes_follow_numpy() {
        let s = |idx: &[SliceIndex]| SlicePlan::new(Dtype::F32, &[10, 5], idx).unwrap().shape().to_vec();
        assert_eq!(s(&[]), [10, 5]);
        assert_eq!(s(&[SliceIndex::Range { start: None, stop: Some(20), step: None }]), [10, 5]);
        assert_eq!(s(&[SliceIndex::Range { start: Some(2), stop: Some(1), step: None }]), [0, 5]);
        assert_eq!(s(&[Index(0), Index(0)]), Vec::<usize>::new());
        assert_eq!(s(&[SliceIndex::Range { start: Some(1), stop: Some(6), step: Some(2) }, SliceIndex::Range { start: Some(1), stop: Some(5), step: Some(3) }]), [3, 2]);
        assert_eq!(s(&[NewAxis, Ellipsis, NewAxis]), [1, 10, 5, 1]);
        assert_eq!(s(&[SliceIndex::Range { start: Some(-3), stop: None, step: None }]), [3, 5]);
    }

    #[test]
    fn errors() {
        let plan = |idx: &[SliceIndex]| SlicePlan::new(Dtype::F32, &[10, 5], idx);
        assert!(matches!(plan(&[FULL, Index(5)]), Err(Error::SliceOutOfBounds { asked: 5, dim: 1, size: 5 })));
        assert!(matches!(plan(&[FULL, Index(-6)]), Err(Error::SliceOutOfBounds { .. })));
        assert!(matches!(plan(&[Index(0), Index(0), Index(0)]), Err(Error::TooManyIndices { .. })));
        assert!(matches!(plan(&[Ellipsis, Ellipsis]), Err(Error::SeveralEllipses)));
        assert!(matches!(plan(&[SliceIndex::Range { start: None, stop: None, step: Some(0) }]), Err(Error::InvalidSlice { .. })));
        assert!(matches!(SlicePlan::new(Dtype::F32, &[], &[FULL]), Err(Error::TooManyIndices { .. })));
    }

    #[test]
    fn contiguous_selections_are_one_range() {
        let plan = SlicePlan::new(Dtype::F32, &[10, 5], &[SliceIndex::range(2, 4)]).unwrap();
        assert_eq!(plan.ranges().collect::<Vec<_>>(), vec![40..80]);
        let plan = SlicePlan::new(Dtype::F32, &[10, 5], &[FULL, SliceIndex::range(0, 2)]).unwrap();
        assert_eq!(plan.num_ranges(), 10);
        assert_eq!(plan.ranges().nth(1), Some(20..28));
    }

    #[test]
    fn sub_byte_needs_byte_boundaries() {
        // F4: two values per byte.
        assert!(SlicePlan::new(Dtype::F4, &[4, 4], &[Index(1)]).is_ok());
        let plan = SlicePlan::new(Dtype::F4, &[4, 4], &[FULL, SliceIndex::range(2, 4)]).unwrap();
        assert_eq!(plan.ranges().next(), Some(1..2));
        assert!(matches!(SlicePlan::new(Dtype::F4, &[4, 4], &[FULL, SliceIndex::range(1, 3)]), Err(Error::Misaligned { .. })));
        assert!(matches!(SlicePlan::new(Dtype::F4, &[3, 3], &[Index(1)]), Err(Error::Misaligned { .. })));
    }

    #[test]
    fn the_span_runs_from_the_first_byte_selected_to_the_last() {
        let shape = [4, 5, 6];
        let cases: [&[SliceIndex]; 5] = [
            &[FULL, Index(2)],
            &[SliceIndex::range(1, 3), FULL, SliceIndex::range(2, 4)],
            &[Index(3)],
            &[SliceIndex::Range { start: Some(0), stop: Some(4), step: Some(3) }, Index(1), Index(5)],
            &[],
        ];
        let tensor: Vec<u8> = (0..4 * 5 * 6 * 2).map(|i| i as u8).collect();
        for indices in cases {
            let plan = SlicePlan::new(Dtype::F16, &shape, indices).unwrap();
            let ranges: Vec<_> = plan.ranges().collect();
            let span = plan.span();
            assert_eq!(span, ranges[0].start..ranges.last().unwrap().end, "{indices:?}");
            let (mut from_tensor, mut from_span) = (vec![0; plan.byte_len()], vec![0; plan.byte_len()]);
            plan.copy_into(&tensor, &mut from_tensor).unwrap();
            plan.copy_from_span(&tensor[span], &mut from_span).unwrap();
            assert_eq!(from_tensor, from_span, "{indices:?}");
            assert_eq!(from_tensor, ranges.iter().flat_map(|r| tensor[r.clone()].to_vec()).collect::<Vec<_>>());
            let gaps = ranges.windows(2).map(|pair| pair[1].start - pair[0].end);
            assert_eq!(plan.largest_gap(), gaps.max().unwrap_or(0), "{indices:?}");
            // In batches of 2: the same runs, each batch filling its part.
            let mut from_batches = vec![0; plan.byte_len()];
            let mut filled = 0;
            for (part, runs) in plan.batches(2) {
                assert!(runs.len() <= 2 && part.start == filled, "{indices:?}");
                for (at, to, len) in runs {
                    from_batches[part.start + to..part.start + to + len].copy_from_slice(&tensor[at..at + len]);
                }
                filled = part.end;
            }
            assert_eq!((filled, from_batches), (plan.byte_len(), from_tensor), "{indices:?}");
        }
        assert_eq!(SlicePlan::new(Dtype::F16, &shape, &[SliceIndex::range(2, 2)]).unwrap().span(), 0..0);
    }

    #[test]
    fn empty_selections_have_no_ranges() {
        let plan = SlicePlan::new(Dtype::F32, &[0, 5], &[]).unwrap();
        assert_eq!(plan.byte_len(), 0);
        assert_eq!(plan.ranges().count(), 0);
        let plan = SlicePlan::new(Dtype::F32, &[3, 5], &[SliceIndex::range(3, 3)]).unwrap();
        assert_eq!(plan.shape(), [0, 5]);
        // No elements, though the other dimensions multiply past 2^64.
        let plan = SlicePlan::new(Dtype::F32, &[0, 1 << 40, 1 << 40], &[FULL, SliceIndex::range(5, 7)]).unwrap();
        assert_eq!((plan.shape(), plan.byte_len()), (&[0, 2, 1 << 40][..], 0));
    }
}
