//! Tensor-parallel plans: which part of each tensor one rank loads.
//!
//! A plan has this rank's position (`rank` of `world_size`) and rules matched
//! against tensor names in order (glob patterns such as `*.q_proj.weight`);
//! the first matching rule says whether the tensor is split along a dimension
//! or replicated. Unmatched tensors are replicated. The selection is a
//! [`SliceIndex`] list, so the rank's bytes come out of [`SlicePlan`] as byte
//! ranges: a rank reads only its own bytes, locally or from object storage.

use globset::{Glob, GlobMatcher};

use crate::error::{Error, Result};
use crate::slice::{SliceIndex, SlicePlan};
use crate::{Dtype, TensorInfo};

/// How a tensor is distributed over the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Every rank loads the whole tensor.
    Replicate,
    /// Each rank loads a contiguous part of this dimension. When the size is
    /// not divisible by the world size, the first `size % world_size` ranks
    /// get one more row (the `torch.tensor_split` / `numpy.array_split` rule).
    Dim(usize),
}

/// This rank's share of every tensor.
#[derive(Debug, Clone)]
pub struct TensorParallelPlan {
    rank: usize,
    world_size: usize,
    rules: Vec<(GlobMatcher, Split)>,
}

impl TensorParallelPlan {
    /// A plan for `rank` of `world_size` with rules `(glob pattern, split)`.
    pub fn new<S: AsRef<str>>(rank: usize, world_size: usize, rules: &[(S, Split)]) -> Result<Self> {
        if world_size == 0 || rank >= world_size {
            return Err(Error::InvalidOption { reason: format!("rank {rank} is not in a world of size {world_size}") });
        }
        let rules = rules
            .iter()
            .map(|(pattern, split)| {
                let glob = Glob::new(pattern.as_ref())
                    .map_err(|e| Error::InvalidOption { reason: format!("bad tensor name pattern {:?}: {e}", pattern.as_ref()) })?;
                Ok((glob.compile_matcher(), *split))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TensorParallelPlan { rank, world_size, rules })
    }

    /// The rule for a tensor name (the first match; `Replicate` if none).
    pub fn split_for(&self, name: &str) -> Split {
        self.rules.iter().find(|(glob, _)| glob.is_match(name)).map_or(Split::Replicate, |(_, split)| *split)
    }

    /// `[start, stop)` of this rank along a dimension of `size`.
    pub fn bounds(&self, size: usize) -> (usize, usize) {
        let (base, extra) = (size / self.world_size, size % self.world_size);
        let start = self.rank * base + self.rank.min(extra);
        (start, start + base + usize::from(self.rank < extra))
    }

    /// The indices selecting this rank's part of tensor `name` of `shape`.
    pub fn selection(&self, name: &str, shape: &[usize]) -> Result<Vec<SliceIndex>> {
        match self.split_for(name) {
            Split::Replicate => Ok(Vec::new()),
            Split::Dim(dim) if dim >= shape.len() => Err(Error::InvalidOption {
                reason: format!("tensor `{}` of shape {shape:?} has no dimension {dim} to split", crate::Printable(name)),
            }),
            Split::Dim(dim) => {
                let (start, stop) = self.bounds(shape[dim]);
                // Only a tensor with no elements can have a dimension this long.
                let too_long = |_| Error::InvalidOption {
                    reason: format!("dimension {dim} of tensor `{}` ({}) is too long to split", crate::Printable(name), shape[dim]),
                };
                let mut indices = vec![SliceIndex::FULL; dim];
                indices.push(SliceIndex::range(i64::try_from(start).map_err(too_long)?, i64::try_from(stop).map_err(too_long)?));
                Ok(indices)
            }
        }
    }

    /// The byte plan of this rank's part of a tensor.
    pub fn plan(&self, name: &str, info: &TensorInfo) -> Result<SlicePlan> {
        self.plan_for(name, info.dtype, &info.shape)
    }

    /// Like [`TensorParallelPlan::plan`] from a dtype and shape.
    pub fn plan_for(&self, name: &str, dtype: Dtype, shape: &[usize]) -> Result<SlicePlan> {
        SlicePlan::new(dtype, shape, &self.selection(name, shape)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_tile_every_dimension() {
        for world in 1..6 {
            for size in [0usize, 1, 7, 8, 13] {
                let mut next = 0;
                for rank in 0..world {
                    let plan = TensorParallelPlan::new(rank, world, &[("*", Split::Dim(0))]).unwrap();
                    let (start, stop) = plan.bounds(size);
                    assert_eq!(start, next, "world {world} size {size}");
                    next = stop;
                }
                assert_eq!(next, size);
            }
        }
    }

    #[test]
    fn a_dimension_past_i64_max_is_refused_not_wrapped() {
        let plan = TensorParallelPlan::new(1, 2, &[("*", Split::Dim(0))]).unwrap();
        let e = plan.plan_for("w", Dtype::F32, &[usize::MAX, 0]).unwrap_err();
        assert!(e.to_string().contains("too long to split"), "{e}");
    }

    #[test]
    fn rules_match_in_order() {
        let rules = [("*.q_proj.weight", Split::Dim(0)), ("*.o_proj.weight", Split::Dim(1)), ("*norm*", Split::Replicate), ("*", Split::Dim(0))];
        let plan = TensorParallelPlan::new(1, 4, &rules).unwrap();
        assert_eq!(plan.split_for("layers.0.q_proj.weight"), Split::Dim(0));
        assert_eq!(plan.split_for("layers.0.o_proj.weight"), Split::Dim(1));
        assert_eq!(plan.split_for("layers.0.input_norm.weight"), Split::Replicate);
        let o = plan.plan_for("layers.0.o_proj.weight", Dtype::F32, &[8, 16]).unwrap();
        assert_eq!(o.shape(), [8, 4]);
        assert_eq!(o.ranges().next(), Some(16..32));
        let q = plan.plan_for("layers.0.q_proj.weight", Dtype::F32, &[8, 16]).unwrap();
        assert_eq!(q.ranges().collect::<Vec<_>>(), vec![128..256]);
        assert!(plan.plan_for("x.q_proj.weight", Dtype::F32, &[]).is_err());
        assert!(TensorParallelPlan::new(4, 4, &rules).is_err());
        assert!(TensorParallelPlan::new(0, 1, &[("[", Split::Replicate)]).is_err());
    }
}
