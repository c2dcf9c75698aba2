//! # tensafe-pickle
//!
//! Converts pickle-based PyTorch checkpoints to safetensors **without
//! executing them**, and scans pickle files for what they would do if loaded.
//!
//! The core is a restricted pickle machine ([`vm`]) written for this purpose:
//! it decodes protocols 0 to 5 (frames included) with CPython's semantics but
//! never imports or calls anything. Globals are matched against an exact
//! allowlist (torch's rebuild functions, storage classes and dtypes,
//! `OrderedDict`, a few builtins) and calls to them are *modelled* as data.
//! In conversion, anything else is refused with the pickle, byte offset,
//! opcode, global and object path; in scanning it is recorded with a severity
//! and the machine carries on.
//!
//! * [`container`]: torch's container rules (zip by the first four bytes,
//!   else tar, else the legacy stream), read strictly; TorchScript and other
//!   code-carrying archives are recognised and refused.
//! * [`extract`]: finds the state dict (bare, `state_dict`, `model`,
//!   Lightning…) and names the tensors.
//! * [`convert`]: views, strides, shared storages, byte order and conj/neg
//!   bits to contiguous safetensors, streamed through
//!   [`tensafe::serialize_to_file`]; sharded checkpoints too.
//! * [`scan`]: every pickle of a file, found by content, with a verdict.
//!
//! ```no_run
//! use tensafe_pickle::{convert_file, scan_file, ConvertOptions, ScanOptions, Verdict};
//! let report = scan_file("model.bin".as_ref(), &ScanOptions::default());
//! if report.verdict == Verdict::Safe {
//!     convert_file("model.bin".as_ref(), "model.safetensors".as_ref(), &ConvertOptions::default()).unwrap();
//! }
//! ```

mod compat;
pub mod container;
pub mod convert;
mod error;
pub mod extract;
mod limits;
pub mod names;
pub mod scan;
mod torch;
pub mod value;
pub mod vm;
pub mod zip;

pub use container::{detect, load, Checkpoint, Kind, LoadOptions};
pub use convert::{
    convert_checkpoint, convert_file, convert_sharded, map_file, plan_checkpoint, read_shard_index, ConvertOptions, ConvertReport, Planned, ShardedReport,
    TensorPlan, TensorReport,
};
pub use error::{Error, PickleError, Result};
pub use extract::ExtractOptions;
pub use limits::Limits;
pub use names::Severity;
pub use scan::{scan_bytes, scan_file, ScanOptions, ScanReport, Verdict};
