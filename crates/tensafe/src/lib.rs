//! # tensafe
//!
//! A strict reader and a byte-identical writer for the
//! [safetensors](https://github.com/huggingface/safetensors) format:
//! an 8-byte little-endian header length, a JSON header, and a flat buffer of
//! little-endian tensor data.
//!
//! * Reading validates everything the reference implementation validates, in
//!   the same order, and more (duplicate names); errors say what is wrong
//!   and where ([`Error`]).
//! * [`SafeTensors`] reads from memory, [`MmapFile`] maps a file,
//!   [`PreadFile`] reads the header alone and tensors on demand.
//! * [`SlicePlan`] plans numpy-style selections as byte ranges.
//! * [`serialize`] / [`serialize_to_file`] write the reference's exact bytes,
//!   streaming tensor data from borrowed buffers, atomically for files.
//!
//! ```
//! use tensafe::{serialize, Dtype, RawTensor, SafeTensors};
//! let data = [0u8; 16];
//! let bytes = serialize([("w", RawTensor { dtype: Dtype::F32, shape: &[2, 2], data: &data })], None).unwrap();
//! let file = SafeTensors::deserialize(&bytes).unwrap();
//! assert_eq!(file.tensor("w").unwrap().shape(), [2, 2]);
//! ```

mod atomic;
mod dtype;
mod error;
mod fs;
mod header;
mod parallel;
mod reader;
mod shards;
mod slice;
mod writer;

pub use atomic::{remove_unfinished_files, write_atomically, write_file_atomically, StagedWrites, MAX_UNNAMED_STAGED_FILES, NAMED_TEMP_FILES_ENV};
pub use dtype::Dtype;
pub use error::{Diagnosis, Error, Result};
pub use fs::{open_regular, FileVersion, FilesystemKind};
pub use header::{Header, Printable, PrintableJson, PrintableLine, ReadOptions, TensorInfo, DEFAULT_MAX_HEADER_SIZE, METADATA_KEY};
pub use parallel::{Split, TensorParallelPlan};
pub use reader::{MmapFile, PreadFile, SafeTensors, SharedMapping, TensorView};
pub use shards::{
    is_checkpoint_path, parse_size, read_index_text, remove_stale_files, MAX_INDEX_SIZE, plan_shards, reshard, save_sharded, Checkpoint, LazyTensor, ShardFile, ShardIndex, ShardPlan, ShardedCheckpoint, TensorSource, INDEX_FILE,
    SINGLE_FILE,
};
pub use slice::{ByteRanges, SliceIndex, SlicePlan};
pub use writer::{
    prepare, serialize, serialize_to_file, serialize_to_file_with, Metadata, Prepared, RawTensor, View, WriteOptions,
};
