//! Errors. Every refusal names where it happened: the pickle (or archive
//! member), the byte offset and opcode, and the object path being built.
//!
//! Messages quote text from the input (names, keys, archive members) with
//! control and invisible format characters escaped ([`Printable`]), so that
//! a hostile checkpoint can neither drive a terminal nor forge log lines,
//! whoever shows the message.

use std::fmt;
use std::path::PathBuf;

use tensafe::Printable;

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
        write!(f, "{}: offset {}", Printable(&self.pickle), self.offset)?;
        if let Some(op) = self.opcode {
            write!(f, " ({op})")?;
        }
        write!(f, ": {}", Printable(&self.reason))?;
        if let Some(path) = &self.path {
            write!(f, " [while building {}]", Printable(path))?;
        }
        Ok(())
    }
}

/// Everything that can go wrong converting or scanning.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading an input failed.
    #[error("{}: {source}", Printable(&path.display().to_string()))]
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
    #[error("{}", Printable(.0))]
    Container(String),
    /// The input is a format this converter does not convert (TorchScript,
    /// tar, 7z, …); the message says what it is.
    #[error("{}", Printable(.0))]
    Unsupported(String),
    /// A tensor cannot be converted.
    #[error("tensor `{}`: {}", Printable(name), Printable(reason))]
    Tensor {
        /// Its flattened name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The checkpoint's structure does not give a state dict.
    #[error("{}", Printable(.0))]
    Structure(String),
    /// A configured limit was reached.
    #[error("limit reached: {}", Printable(.0))]
    Limit(String),
    /// An error in one input file of several (a shard), named.
    #[error("{}: {source}", Printable(&path.display().to_string()))]
    InFile {
        /// The input file.
        path: PathBuf,
        /// What went wrong in it.
        source: Box<Error>,
    },
    /// Writing the output failed (the core escapes what it quotes).
    #[error(transparent)]
    Write(#[from] tensafe::Error),
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// A terminal escape, a right-to-left override and a forged new line.
    const HOSTILE: &str = "w\u{1b}[2J\u{202e}\nOK: done";

    #[test]
    fn messages_escape_what_they_quote_from_the_input() {
        let pickle = PickleError {
            pickle: format!("archive/{HOSTILE}.pkl"),
            offset: 7,
            opcode: Some("GLOBAL"),
            reason: format!("refused {HOSTILE}"),
            path: Some(format!("['{HOSTILE}']")),
        };
        let errors = [
            Error::Io { path: PathBuf::from(HOSTILE), source: std::io::Error::other("gone") },
            Error::Pickle(Box::new(pickle)),
            Error::Container(HOSTILE.into()),
            Error::Unsupported(HOSTILE.into()),
            Error::Tensor { name: HOSTILE.into(), reason: HOSTILE.into() },
            Error::Structure(HOSTILE.into()),
            Error::Limit(HOSTILE.into()),
            Error::InFile { path: PathBuf::from(HOSTILE), source: Box::new(Error::Limit("x".into())) },
            Error::Write(tensafe::Error::Io { context: HOSTILE.into(), source: std::io::Error::other("full") }.in_file(HOSTILE)),
        ];
        for error in errors {
            let text = error.to_string();
            assert!(!text.chars().any(|c| c.is_control() || c == '\u{202e}'), "{text:?}");
            assert!(text.contains(r"w\u{1b}[2J\u{202e}\nOK: done"), "{text:?}");
        }
    }
}
