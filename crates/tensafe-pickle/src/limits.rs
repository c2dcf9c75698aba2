//! Limits against denial of service. Every one is checked before the memory
//! or time it protects is spent.

/// Configurable limits; [`Limits::default`] gives the documented defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest pickle (e.g. `data.pkl`) read.
    pub max_pickle_bytes: u64,
    /// Value stack depth.
    pub max_stack: usize,
    /// Mark stack depth.
    pub max_marks: usize,
    /// Memo entries (kept in a map, whatever the indices: 32 bytes an
    /// entry before the map's own overhead). torch puts about 8 per tensor
    /// (8,006 for a `torch.save`d state dict of 1000 tensors, counted with
    /// pickletools), so this admits [`Limits::max_tensors`] of them.
    pub max_memo: usize,
    /// Objects (tuples, lists, dicts, tensors, …) all the pickles of one
    /// file make: about 90 bytes each (a 5 MB pickle of nested TUPLE1s took
    /// 429 MB), and a pickle can make one per input byte. torch writes about
    /// 8 per tensor (the opcodes of a `torch.save`d state dict of 1000
    /// tensors, counted with pickletools).
    pub max_objects: usize,
    /// One str or bytes argument (it must also fit in the remaining input).
    pub max_string: u64,
    /// LONG1/LONG4 payload bytes.
    pub max_long_bytes: u64,
    /// Nesting of containers walked when extracting.
    pub max_nesting: usize,
    /// Tensor paths emitted by the extraction walk (shared-reference explosions).
    pub max_paths: usize,
    /// Bytes of all the paths (dotted names) the extraction walk builds.
    pub max_path_bytes: u64,
    /// Tensors in one checkpoint.
    pub max_tensors: usize,
    /// Tensor dimensions.
    pub max_ndim: usize,
    /// Output bytes allowed whatever the input: the budget is
    /// `max(output_factor × unique storage bytes, min_output_budget)`.
    pub min_output_budget: u64,
    /// See [`Limits::min_output_budget`].
    pub output_factor: u64,
    /// Zip entries.
    pub max_zip_entries: usize,
    /// Zip entry name length.
    pub max_name_len: usize,
    /// Bytes all deflated zip entries of one archive may inflate to, in
    /// memory (each must also inflate to exactly its declared size). torch
    /// writes stored entries, so only re-zipped files use this.
    pub max_inflate: u64,
    /// Extra work units (container copies, key hashing, summaries) allowed
    /// per input byte, so that time stays linear in the input.
    pub work_per_byte: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pickle_bytes: 256 << 20,
            max_stack: 1_000_000,
            max_marks: 100_000,
            max_memo: 10_000_000,
            max_objects: 16_000_000,
            max_string: 64 << 20,
            max_long_bytes: 64,
            max_nesting: 1_000,
            max_paths: 1_000_000,
            max_path_bytes: 256 << 20,
            max_tensors: 1_000_000,
            max_ndim: 64,
            min_output_budget: 64 << 20,
            output_factor: 2,
            max_zip_entries: 1_000_000,
            max_name_len: 4096,
            max_inflate: 4 << 30,
            work_per_byte: 64,
        }
    }
}

impl Limits {
    /// The most bytes a conversion may write when its tensors' storages hold
    /// `storage_bytes`: `max(output_factor × storage_bytes, min_output_budget)`.
    /// The converter counts the storage records it read; the scanner, which
    /// may see no records, the sizes the storages declare.
    pub fn output_budget(&self, storage_bytes: u64) -> u64 {
        storage_bytes.saturating_mul(self.output_factor).max(self.min_output_budget)
    }
}
