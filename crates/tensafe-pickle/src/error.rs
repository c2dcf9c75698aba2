//! Errors. Every refusal names where it happened: the pickle (or archive
//! member), the byte offset and opcode, and the object path being built.

use std::fmt;
use std::path::PathBuf;

/// Where in a pickle something went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickleError {
    /// The pickle: an archive member such as `archive/data.pkl`, or a
    /// description such as `legacy pickle 4 (object)`.
    pub pickle: String,
    /// Byte offset of the opcode in the pickle.
    pub offset: u64,
    /// The opcode's name, when the error is tied to one.
    pub opcode: Option<&'static str>,
    /// What is wrong.
    pub reason: String,
    /// The object being built, e.g. `['state_dict']['w'] → _rebuild_tensor_v2(…)[0]`.
    pub path: Option<String>,
}

impl fmt::Display for PickleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: offset {}", self.pickle, self.offset)?;
        if let Some(op) = self.opcode {
            write!(f, " ({op})")?;
        }
        write!(f, ": {}", self.reason)?;
        if let Some(path) = &self.path {
            write!(f, " [while building {path}]")?;
        }
        Ok(())
    }
}

/// Everything that can go wrong converting or scanning.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading an input failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A pickle was refused or is malformed.
    #[error("{0}")]
    Pickle(Box<PickleError>),
    /// The container (zip, legacy stream, tar) is malformed or breaks a
    /// strictness rule.
    #[error("{0}")]
    Container(String),
    /// The input is a format this converter does not convert (TorchScript,
    /// tar, 7z, …); the message says what it is.
    #[error("{0}")]
    Unsupported(String),
    /// A tensor cannot be converted.
    #[error("tensor `{name}`: {reason}")]
    Tensor {
        /// Its flattened name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The checkpoint's structure does not give a state dict.
    #[error("{0}")]
    Structure(String),
    /// A configured limit was reached.
    #[error("limit reached: {0}")]
    Limit(String),
    /// Writing the output failed.
    #[error(transparent)]
    Write(#[from] tensafe::Error),
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
