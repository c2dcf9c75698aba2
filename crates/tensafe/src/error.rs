//! The one error type of the crate.
//!
//! Every message starts with the reference implementation's text for the same
//! failure (so code that matches on those texts keeps working) and continues
//! with what tensafe knows beyond it: sizes, offsets, the tensor, and a
//! diagnosis of what the file really is when it is not safetensors at all.

use std::fmt;
use std::path::PathBuf;

use crate::header::{Printable, PrintableLine};
use crate::Dtype;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong reading, slicing or writing a safetensors file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Fewer than 8 bytes: not even the header length is there.
    #[error("header too small: {} has {file_len} bytes, fewer than the 8-byte header length{hint}", if *.file_len == 0 { "the input is empty and" } else { "the input" })]
    HeaderTooSmall { file_len: u64, hint: Diagnosis },

    /// The header length is above the configured limit.
    #[error("header too large: the first 8 bytes declare a {declared}-byte header, above the limit of {limit} bytes{hint}")]
    HeaderTooLarge { declared: u64, limit: u64, hint: Diagnosis },

    /// A file being written would have a header above the limit readers accept.
    #[error("header too large: the tensors' names, shapes and the metadata take a {size}-byte header, above the limit of {limit} bytes that readers accept")]
    HeaderTooLargeToWrite { size: u64, limit: u64 },

    /// The header length points past the end of the input.
    #[error("invalid header length: the first 8 bytes declare a {declared}-byte header but only {available} bytes follow them{hint}")]
    InvalidHeaderLength { declared: u64, available: u64, hint: Diagnosis },

    /// The header is not UTF-8.
    #[error("invalid UTF-8 in header: {source} (file offset {offset}){hint}")]
    InvalidUtf8 { source: std::str::Utf8Error, offset: u64, hint: Diagnosis },

    /// The header is not the JSON the format requires (includes tensafe's
    /// stricter checks: duplicate names, the reserved name).
    #[error("invalid JSON in header: {source}{hint}")]
    InvalidJson { source: serde_json::Error, hint: Diagnosis },

    /// A tensor does not start where the previous one ended.
    #[error("invalid offset for tensor `{}`: data_offsets [{begin}, {end}] but the tensor must start at {expected} (file offset {file_offset}); the data section has a hole, an overlap or reversed offsets", Printable(.name))]
    InvalidOffset { name: String, begin: u64, end: u64, expected: u64, file_offset: u64 },

    /// Shape × dtype does not fit in the address space.
    #[error("overflow computing buffer size from shape and/or element type (tensor `{}`, shape {shape:?})", Printable(.name))]
    Overflow { name: String, shape: Vec<usize> },

    /// A sub-byte tensor or selection does not start and end on a byte.
    #[error("The slice is slicing for subbytes dtypes, and the slice does not end up at a byte boundary, this is invalid.{}", misaligned_context(.name))]
    Misaligned { name: Option<String> },

    /// The byte range of a tensor does not match its shape and dtype.
    #[error("invalid shape, data type, or offset for tensor `{}`: {dtype} with shape {shape:?} takes {expected} bytes but data_offsets span {actual}", Printable(.name))]
    TensorInvalidInfo { name: String, dtype: Dtype, shape: Vec<usize>, expected: u64, actual: u64 },

    /// The tensors do not cover the data section exactly.
    #[error("incomplete metadata, file not fully covered: {}", coverage_text(*.expected, *.actual))]
    MetadataIncompleteBuffer { expected: u64, actual: u64 },

    /// No tensor of that name.
    #[error("tensor `{}` not found", Printable(.name))]
    TensorNotFound { name: String },

    /// A slice index past the end of a dimension.
    #[error("index {asked} out of bounds for tensor dimension #{dim} of size {size}")]
    SliceOutOfBounds { asked: i64, dim: usize, size: usize },

    /// More indices than the tensor has dimensions.
    #[error("more slicing indexes than dimensions in tensor: {given} indexes for shape {shape:?}")]
    TooManyIndices { given: usize, shape: Vec<usize> },

    /// An index tensafe does not support (a non-positive step, …).
    #[error("invalid slice: {}", PrintableLine(.reason))]
    InvalidSlice { reason: String },

    /// An index with more than one `...` (numpy refuses it too, as an IndexError).
    #[error("invalid slice: {SEVERAL_ELLIPSES}")]
    SeveralEllipses,

    /// A caller's buffer has the wrong size for what is copied into it.
    #[error("destination buffer has {actual} bytes but {expected} are needed")]
    BufferSize { expected: u64, actual: u64 },

    /// A name the writer refuses.
    #[error("invalid tensor name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },

    /// An invalid writer option.
    #[error("invalid option: {}", PrintableLine(.reason))]
    InvalidOption { reason: String },

    /// A sharded checkpoint whose index and shards disagree. (The reasons
    /// of this and the other `reason` variants escaped the names they quote
    /// already: their backslashes are not escaped again.)
    #[error("invalid checkpoint: {}", PrintableLine(.reason))]
    InvalidCheckpoint { reason: String },

    /// An operating-system error, with what tensafe was doing.
    #[error("I/O error: {source} ({})", Printable(.context))]
    Io { context: String, source: std::io::Error },

    /// An error about a named file.
    #[error("{}: {source}", Printable(&.path.display().to_string()))]
    InFile { path: PathBuf, source: Box<Error> },
}

impl Error {
    /// Attaches the file the error is about.
    pub fn in_file(self, path: impl Into<PathBuf>) -> Error {
        match self {
            already @ Error::InFile { .. } => already,
            other => Error::InFile { path: path.into(), source: Box::new(other) },
        }
    }

    /// The error without the file it is about.
    pub fn without_file(&self) -> &Error {
        match self {
            Error::InFile { source, .. } => source.without_file(),
            other => other,
        }
    }

    /// The reference implementation's wording of this error, for callers that
    /// need the exact compatible text (tensafe's own messages start with it).
    pub fn reference_text(&self) -> String {
        match self.without_file() {
            Error::HeaderTooSmall { .. } => "header too small".into(),
            Error::HeaderTooLarge { .. } | Error::HeaderTooLargeToWrite { .. } => "header too large".into(),
            Error::InvalidHeaderLength { .. } => "invalid header length".into(),
            Error::InvalidUtf8 { source, .. } => format!("invalid UTF-8 in header: {source}"),
            Error::InvalidJson { source, .. } => format!("invalid JSON in header: {source}"),
            Error::InvalidOffset { name, .. } => format!("invalid offset for tensor `{}`", Printable(name)),
            Error::Overflow { .. } => "overflow computing buffer size from shape and/or element type".into(),
            Error::Misaligned { .. } => Error::Misaligned { name: None }.to_string(),
            Error::TensorInvalidInfo { .. } => "invalid shape, data type, or offset for tensor".into(),
            Error::MetadataIncompleteBuffer { .. } => "incomplete metadata, file not fully covered".into(),
            Error::SliceOutOfBounds { asked, dim, size } => {
                format!("index {asked} out of bounds for tensor dimension #{dim} of size {size}")
            }
            Error::TooManyIndices { .. } => "more slicing indexes than dimensions in tensor".into(),
            Error::SeveralEllipses => SEVERAL_ELLIPSES.into(),
            Error::Io { source, .. } => format!("I/O error: {source}"),
            other => other.to_string(),
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io { context: context.into(), source }
    }
}

/// The reference's text for an index with several ellipses.
const SEVERAL_ELLIPSES: &str = "Only one ellipsis (...) is allowed in slice index";

fn misaligned_context(name: &Option<String>) -> String {
    match name {
        Some(name) => format!(" (tensor `{}`)", Printable(name)),
        None => String::new(),
    }
}

fn coverage_text(expected: u64, actual: u64) -> String {
    if actual < expected {
        format!(
            "expected {expected} bytes, found {actual}; the file is truncated ({} bytes missing: an interrupted download or copy?)",
            expected - actual
        )
    } else {
        format!(
            "the tensors end at byte {expected} but the file has {actual} bytes ({} unexplained trailing bytes)",
            actual - expected
        )
    }
}

/// What a file that failed to parse as safetensors looks like instead.
///
/// Attached to the errors of the first parsing steps, where a wrong file
/// usually fails; `Display` is empty when nothing recognisable was found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Diagnosis {
    /// Nothing recognisable.
    #[default]
    Unknown,
    /// A Git LFS pointer file, with the size of the object it points to.
    GitLfsPointer { size: Option<u64> },
    /// An HTML document, typically an error or login page.
    Html,
    /// A JSON document (an API error, or an index file passed by mistake).
    Json,
    /// A zip archive, typically a PyTorch checkpoint.
    Zip,
    /// A Python pickle stream, typically a legacy PyTorch checkpoint.
    Pickle,
    /// Looks like a safetensors header that stops before its end.
    TruncatedHeader,
}

impl Diagnosis {
    /// Recognises common wrong files from their first bytes.
    pub fn sniff(prefix: &[u8]) -> Diagnosis {
        let text_start = prefix.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(prefix.len());
        let text = &prefix[text_start..];
        let starts_ci = |needle: &[u8]| text.len() >= needle.len() && text[..needle.len()].eq_ignore_ascii_case(needle);
        if prefix.starts_with(b"version https://git-lfs.github.com/spec/") {
            let size = std::str::from_utf8(prefix)
                .ok()
                .and_then(|s| s.lines().find_map(|l| l.strip_prefix("size ")))
                .and_then(|s| s.trim().parse().ok());
            Diagnosis::GitLfsPointer { size }
        } else if starts_ci(b"<!doctype html") || starts_ci(b"<html") || starts_ci(b"<?xml") || starts_ci(b"<head") {
            Diagnosis::Html
        } else if text.first().is_some_and(|b| *b == b'{' || *b == b'[') {
            Diagnosis::Json
        } else if prefix.starts_with(b"PK\x03\x04") || prefix.starts_with(b"PK\x05\x06") {
            Diagnosis::Zip
        } else if prefix.len() >= 2 && prefix[0] == 0x80 && (2..=5).contains(&prefix[1]) {
            Diagnosis::Pickle
        } else if prefix.len() > 8 && prefix[8] == b'{' {
            Diagnosis::TruncatedHeader
        } else {
            Diagnosis::Unknown
        }
    }
}

impl fmt::Display for Diagnosis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Diagnosis::Unknown => Ok(()),
            Diagnosis::GitLfsPointer { size: Some(size) } => write!(
                f,
                "; this is a Git LFS pointer file, not the weights (the real file has {size} bytes): fetch it with `git lfs pull`"
            ),
            Diagnosis::GitLfsPointer { size: None } => {
                f.write_str("; this is a Git LFS pointer file, not the weights: fetch it with `git lfs pull`")
            }
            Diagnosis::Html => f.write_str("; this is an HTML page (an error or login page saved in place of the file?), not safetensors"),
            Diagnosis::Json => f.write_str("; this is a JSON document (an error response, or an index file?), not safetensors"),
            Diagnosis::Zip => f.write_str("; this is a zip archive (a PyTorch checkpoint?), not safetensors"),
            Diagnosis::Pickle => f.write_str(
                "; this is a Python pickle (a legacy PyTorch checkpoint?), not safetensors; never unpickle untrusted files",
            ),
            Diagnosis::TruncatedHeader => f.write_str("; the file ends inside the header: it is truncated (an interrupted download?)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_common_wrong_files() {
        let lfs = b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 90868376\n";
        assert_eq!(Diagnosis::sniff(lfs), Diagnosis::GitLfsPointer { size: Some(90868376) });
        assert_eq!(Diagnosis::sniff(b"\n<!DOCTYPE html><html>"), Diagnosis::Html);
        assert_eq!(Diagnosis::sniff(b"{\"error\": \"not found\"}"), Diagnosis::Json);
        assert_eq!(Diagnosis::sniff(b"PK\x03\x04rest"), Diagnosis::Zip);
        assert_eq!(Diagnosis::sniff(b"\x80\x02}q\x00"), Diagnosis::Pickle);
        assert_eq!(Diagnosis::sniff(b"\x10\0\0\0\0\0\0\0{\"a\""), Diagnosis::TruncatedHeader);
        assert_eq!(Diagnosis::sniff(b"\x01\x02"), Diagnosis::Unknown);
        assert_eq!(Diagnosis::Unknown.to_string(), "");
    }

    #[test]
    fn messages_start_with_the_reference_text() {
        let err = Error::MetadataIncompleteBuffer { expected: 100, actual: 60 };
        assert!(err.to_string().starts_with(&err.reference_text()));
        assert!(err.to_string().contains("expected 100 bytes, found 60"), "{err}");
        let err = Error::InvalidOffset { name: "w".into(), begin: 4, end: 8, expected: 0, file_offset: 72 }.in_file("m.safetensors");
        assert!(err.to_string().starts_with("m.safetensors: invalid offset for tensor `w`"), "{err}");
        assert_eq!(err.reference_text(), "invalid offset for tensor `w`");
    }

    #[test]
    fn messages_escape_the_text_they_quote() {
        let hostile = "a\u{1b}[2J\nOK";
        let errors = [
            Error::InvalidSlice { reason: hostile.into() },
            Error::InvalidOption { reason: hostile.into() },
            Error::InvalidCheckpoint { reason: hostile.into() },
            Error::io(hostile, std::io::Error::other("full")).in_file(hostile),
        ];
        for error in errors {
            let text = error.to_string();
            assert!(!text.chars().any(char::is_control), "{text:?}");
            assert!(text.contains(r"a\u{1b}[2J\nOK"), "{text:?}");
        }
    }

    #[test]
    fn a_name_escaped_in_a_reason_is_not_escaped_again() {
        let reason = format!("missing shard {} (listed in the index)", Printable("a\\b\n"));
        let text = Error::InvalidCheckpoint { reason }.to_string();
        assert_eq!(text, r"invalid checkpoint: missing shard a\\b\n (listed in the index)");
    }
}
