//! Fuzzes [`SlicePlan`] against an independent, element-by-element model of
//! numpy basic indexing.
//!
//! The input is decoded (see [`Case::decode`]) into a dtype, a small shape and a
//! list of indices. The model resolves the indices itself (it shares no code
//! with the planner) into an output shape and the source element of every
//! output element, or into "error". Then:
//!
//! * when the model says "error", the planner must refuse too;
//! * when the model accepts, the planner must accept as well, except that a
//!   selection of a sub-byte dtype may be refused as `Misaligned`;
//! * an accepted plan must have the model's shape, its byte runs must stay
//!   inside the tensor, and `copy_into` must produce exactly the bytes of the
//!   per-element gather (done bit by bit for the sub-byte dtypes).
//!
//! Nothing may panic, whatever the indices (extreme integers included).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tensafe::{Dtype, Error, SliceIndex, SlicePlan};

/// Most dimensions a decoded shape has.
const MAX_RANK: usize = 4;
/// Largest decoded dimension.
const MAX_DIM: usize = 16;
/// Most indices decoded from one input.
const MAX_INDICES: usize = 10;

/// One decoded test case.
#[derive(Debug)]
struct Case {
    dtype: Dtype,
    shape: Vec<usize>,
    indices: Vec<SliceIndex>,
}

/// Reads bytes off the front of the input; missing bytes read as zero.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    /// A signed integer: one byte read as an `i8`, or, after the escape byte
    /// `0x7f`, a full little-endian `i64` (for the extremes).
    fn int(&mut self) -> i64 {
        match self.byte() {
            0x7f => i64::from_le_bytes(std::array::from_fn(|_| self.byte())),
            b => i64::from(b as i8),
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Case {
    /// Decodes a case:
    ///
    /// ```text
    /// dtype (index into Dtype::ALL, modulo), rank (mod 5), rank × dim (mod 17),
    /// then indices until the input ends, each a tag byte (mod 4):
    ///   0: Index(int)
    ///   1: Range, then a flag byte (bit 0 start, bit 1 stop, bit 2 step present)
    ///      and an int for each bound present, in that order
    ///   2: Ellipsis
    ///   3: NewAxis
    /// where an int is one signed byte, or 0x7f followed by 8 bytes (i64 LE).
    /// ```
    fn decode(data: &[u8]) -> Case {
        let mut input = Bytes(data);
        let dtype = Dtype::ALL[usize::from(input.byte()) % Dtype::ALL.len()];
        let rank = usize::from(input.byte()) % (MAX_RANK + 1);
        let shape = (0..rank).map(|_| usize::from(input.byte()) % (MAX_DIM + 1)).collect();
        let mut indices = Vec::new();
        while !input.is_empty() && indices.len() < MAX_INDICES {
            let index = match input.byte() % 4 {
                0 => SliceIndex::Index(input.int()),
                1 => {
                    let flags = input.byte();
                    let mut bound = |bit: u8| (flags & bit != 0).then(|| input.int());
                    let start = bound(1);
                    let stop = bound(2);
                    let step = bound(4);
                    SliceIndex::Range { start, stop, step }
                }
                2 => SliceIndex::Ellipsis,
                _ => SliceIndex::NewAxis,
            };
            indices.push(index);
        }
        Case { dtype, shape, indices }
    }
}

/// The model's answer: the output shape, and for each output element in
/// row-major order the flat index of the source element it copies.
struct Expected {
    shape: Vec<usize>,
    sources: Vec<usize>,
}

/// The selected positions along one input dimension.
type Axis = Vec<usize>;

/// numpy basic indexing, written for clarity rather than speed; arithmetic is
/// done in `i128` so that no `i64` input can overflow it. `None` means numpy
/// raises (or tensafe documents a refusal, as for non-positive steps).
fn model(shape: &[usize], indices: &[SliceIndex]) -> Option<Expected> {
    let ellipses = indices.iter().filter(|i| matches!(i, SliceIndex::Ellipsis)).count();
    let consuming = indices.iter().filter(|i| matches!(i, SliceIndex::Index(_) | SliceIndex::Range { .. })).count();
    if ellipses > 1 || consuming > shape.len() {
        return None;
    }

    // Per input dimension, the positions taken. Output dimensions: Some(k) for
    // input dimension k, None for a new axis; indexed dimensions have none.
    let mut axes: Vec<Axis> = Vec::new();
    let mut out_dims: Vec<Option<usize>> = Vec::new();
    let full = |size: usize| (0..size).collect::<Axis>();
    for index in indices {
        match *index {
            SliceIndex::NewAxis => out_dims.push(None),
            SliceIndex::Ellipsis => {
                for _ in 0..shape.len() - consuming {
                    out_dims.push(Some(axes.len()));
                    axes.push(full(shape[axes.len()]));
                }
            }
            SliceIndex::Index(i) => {
                let size = shape[axes.len()] as i128;
                let i = i128::from(i);
                let resolved = if i < 0 { i + size } else { i };
                if !(0..size).contains(&resolved) {
                    return None;
                }
                axes.push(vec![resolved as usize]);
            }
            SliceIndex::Range { start, stop, step } => {
                let size = shape[axes.len()] as i128;
                let step = i128::from(step.unwrap_or(1));
                if step <= 0 {
                    return None;
                }
                // Python's slice.indices() for a positive step.
                let clamp = |bound: Option<i64>, default: i128| match bound.map(i128::from) {
                    None => default,
                    Some(b) if b < 0 => (b + size).max(0),
                    Some(b) => b.min(size),
                };
                let (start, stop) = (clamp(start, 0), clamp(stop, size));
                let mut positions = Axis::new();
                let mut p = start;
                while p < stop {
                    positions.push(p as usize);
                    p += step;
                }
                out_dims.push(Some(axes.len()));
                axes.push(positions);
            }
        }
    }
    while axes.len() < shape.len() {
        out_dims.push(Some(axes.len()));
        axes.push(full(shape[axes.len()]));
    }

    let out_shape: Vec<usize> = out_dims.iter().map(|d| d.map_or(1, |k| axes[k].len())).collect();

    // Row-major strides of the input, and an odometer over the selected
    // positions of every input dimension (new axes do not change the order).
    let mut strides = vec![1usize; shape.len()];
    for k in (0..shape.len().saturating_sub(1)).rev() {
        strides[k] = strides[k + 1] * shape[k + 1];
    }
    let mut sources = Vec::new();
    if axes.iter().all(|positions| !positions.is_empty()) {
        let mut odometer = vec![0usize; axes.len()];
        'outer: loop {
            sources.push(odometer.iter().enumerate().map(|(k, &i)| axes[k][i] * strides[k]).sum());
            for k in (0..axes.len()).rev() {
                odometer[k] += 1;
                if odometer[k] < axes[k].len() {
                    continue 'outer;
                }
                odometer[k] = 0;
            }
            break;
        }
    }
    debug_assert_eq!(sources.len(), out_shape.iter().product::<usize>());
    Some(Expected { shape: out_shape, sources })
}

/// A source tensor whose bytes are all different-looking (a cheap hash of the
/// byte's position), so that a wrong offset shows.
fn source_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i as u32).wrapping_mul(0x9e37_79b1) >> 24) as u8 ^ (i as u8)).collect()
}

/// Gathers `sources` out of `src`, element by element. Elements of sub-byte
/// dtypes are moved bit by bit in a little-endian bit order; any fixed bit
/// order gives the same bytes, since a valid plan only copies whole bytes.
fn gather(dtype: Dtype, src: &[u8], sources: &[usize]) -> Vec<u8> {
    match dtype.size() {
        Some(size) => sources.iter().flat_map(|&e| &src[e * size..(e + 1) * size]).copied().collect(),
        None => {
            let bits = dtype.bits();
            let total_bits = sources.len() * bits;
            assert!(total_bits.is_multiple_of(8), "a sub-byte selection that is not whole bytes was accepted");
            let mut out = vec![0u8; total_bits / 8];
            for (o, &e) in sources.iter().enumerate() {
                for b in 0..bits {
                    let from = e * bits + b;
                    let to = o * bits + b;
                    let bit = (src[from / 8] >> (from % 8)) & 1;
                    out[to / 8] |= bit << (to % 8);
                }
            }
            out
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let case = Case::decode(data);
    let expected = model(&case.shape, &case.indices);
    let plan = SlicePlan::new(case.dtype, &case.shape, &case.indices);

    let (plan, expected) = match (plan, expected) {
        (Err(_), None) => return,
        (Ok(plan), None) => panic!("{case:?}: numpy refuses this selection but tensafe planned {plan:?}"),
        (Err(Error::Misaligned { .. }), Some(_)) if case.dtype.size().is_none() => return,
        (Err(e), Some(expected)) => {
            panic!("{case:?}: valid selection (shape {:?}) refused: {e}", expected.shape)
        }
        (Ok(plan), Some(expected)) => (plan, expected),
    };
    assert_eq!(plan.shape(), expected.shape.as_slice(), "{case:?}: wrong output shape");

    let elements: usize = case.shape.iter().product();
    let tensor_len = case.dtype.byte_len(elements);
    let Some(tensor_len) = tensor_len else {
        // A sub-byte tensor that is not whole bytes cannot exist in a file; the
        // plan is still computed, but there is nothing to copy from.
        return;
    };
    let src = source_bytes(tensor_len);

    // The runs: inside the tensor, adding up to byte_len, counted right.
    let ranges: Vec<_> = plan.ranges().collect();
    assert_eq!(ranges.len(), plan.num_ranges(), "{case:?}: num_ranges disagrees with ranges()");
    assert_eq!(ranges.iter().map(|r| r.len()).sum::<usize>(), plan.byte_len(), "{case:?}");
    assert!(
        ranges.iter().all(|r| r.start <= r.end && r.end <= tensor_len),
        "{case:?}: range outside the tensor: {ranges:?}"
    );

    let mut got = vec![0u8; plan.byte_len()];
    plan.copy_into(&src, &mut got).unwrap_or_else(|e| panic!("{case:?}: copy_into failed: {e}"));
    let want = gather(case.dtype, &src, &expected.sources);
    assert!(got == want, "{case:?}: copied {got:?}, numpy gives {want:?}");

    // Wrong buffer sizes are errors, never panics or short copies.
    let mut longer = vec![0u8; plan.byte_len() + 1];
    assert!(plan.copy_into(&src, &mut longer).is_err());
    if plan.byte_len() > 0 {
        let mut shorter = vec![0u8; plan.byte_len() - 1];
        assert!(plan.copy_into(&src, &mut shorter).is_err());
        let last_needed = ranges.iter().map(|r| r.end).max().unwrap_or(0);
        assert!(
            plan.copy_into(&src[..last_needed - 1], &mut got).is_err(),
            "{case:?}: a truncated tensor must be refused"
        );
    }
});
