//! The error type of remote reads.
//!
//! Text that comes from a server (error bodies, status reasons) is shown
//! through [`Printable`], so that a hostile server cannot put terminal
//! control sequences or forged lines into a caller's messages and logs.

use std::ops::Range;

use tensafe::Printable;

/// What went wrong with a remote read. Every message names the URL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RemoteError {
    /// The text is not a URL of a supported kind.
    #[error("{url:?} is not a supported remote URL: {reason} (use s3://, gs://, az://, abfs[s]://, http:// or https://)")]
    InvalidUrl {
        /// What was given.
        url: String,
        /// Why it was refused.
        reason: String,
    },
    /// The store could not be set up (missing bucket, account, bad option…).
    #[error("{url}: cannot configure the object store client: {}", Printable(&source.to_string()))]
    Config {
        /// The URL.
        url: String,
        /// The client's error.
        #[source]
        source: Box<object_store::Error>,
    },
    /// 404, or the bucket or container does not exist.
    #[error("{url}: not found (HTTP 404): {}", Printable(detail))]
    NotFound {
        /// The URL.
        url: String,
        /// The server's explanation.
        detail: String,
    },
    /// 401/403: missing, wrong or insufficient credentials.
    #[error("{url}: access denied (HTTP {status}): {}; check the credentials in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_ACCOUNT_KEY …)", Printable(detail))]
    Forbidden {
        /// The URL.
        url: String,
        /// 401 or 403.
        status: u16,
        /// The server's explanation.
        detail: String,
    },
    /// A cloud store answered with a redirect to another host, which is not
    /// followed: the request carries credentials.
    #[error("{url}: the store redirected the request to {location:?}, another host; tensafe does not follow redirects away from an s3://, gs:// or az:// endpoint, because its requests carry credentials (point the endpoint or region at the host that serves the object)")]
    Redirected {
        /// The URL.
        url: String,
        /// Where the redirect pointed (as sent).
        location: String,
    },
    /// 416: the range asked for starts past the end of the object.
    #[error("{url}: the server refused bytes {}..{} (HTTP 416 Range Not Satisfiable): the object is shorter than its header says, or it changed while being read", range.start, range.end)]
    RangeNotSatisfiable {
        /// The URL.
        url: String,
        /// The range asked for.
        range: Range<u64>,
    },
    /// The server answered a range request with the whole object (200
    /// instead of 206). The body is dropped unread.
    #[error("{url}: the server ignores HTTP Range requests (it answered 200 with the whole object instead of 206 Partial Content); tensafe refuses to download the whole object to read part of it; serve the file from a server with range support (S3-compatible stores, nginx, Apache, …)")]
    RangeIgnored {
        /// The URL.
        url: String,
    },
    /// The object changed (another ETag or size) between opening it and
    /// reading from it.
    #[error("{url}: the object changed while it was being read ({change}); open it again")]
    Changed {
        /// The URL.
        url: String,
        /// What differs from the object seen when the file was opened.
        change: String,
    },
    /// The server sent a different number of bytes than asked for, on every try.
    #[error("{url}: asked for bytes {}..{} ({} bytes) but the server sent {received} bytes{}; the data was discarded", range.start, range.end, range.end - range.start, if *attempts > 1 { format!(", {attempts} times") } else { String::new() })]
    WrongLength {
        /// The URL.
        url: String,
        /// The range asked for.
        range: Range<u64>,
        /// Bytes received on the last try (at least how many, when too many).
        received: u64,
        /// Tries made.
        attempts: u32,
    },
    /// The response body broke off (or ran on past its length), on every try.
    #[error("{url}: the response for bytes {}..{} broke off after {received} bytes{}: {}", range.start, range.end, if *attempts > 1 { format!(" ({attempts} tries)") } else { String::new() }, Printable(&source.to_string()))]
    Interrupted {
        /// The URL.
        url: String,
        /// The range asked for.
        range: Range<u64>,
        /// Bytes received on the last try before the failure.
        received: u64,
        /// Tries made.
        attempts: u32,
        /// The client's error.
        #[source]
        source: Box<object_store::Error>,
    },
    /// The tries of a request ran out of time: the server is too slow, or
    /// stalled.
    #[error("{url}: gave up on bytes {}..{} after {:.1} s and {attempts} tries ({received} bytes had arrived in the last one): the server is stalled or too slow (the limits are RemoteOptions' retry_timeout plus timeout)", range.start, range.end, after.as_secs_f64())]
    TimedOut {
        /// The URL.
        url: String,
        /// The range asked for.
        range: Range<u64>,
        /// Bytes received in the last try.
        received: u64,
        /// Tries made.
        attempts: u32,
        /// Time since the first try began.
        after: std::time::Duration,
    },
    /// A read outside the object.
    #[error("{url}: bytes {}..{} asked for, but the object has {size} bytes", range.start, range.end)]
    OutOfBounds {
        /// The URL.
        url: String,
        /// The range asked for.
        range: Range<u64>,
        /// The object's size.
        size: u64,
    },
    /// The caller's request does not fit its buffer (overlaps, too small).
    #[error("invalid read request: {reason}")]
    InvalidRequest {
        /// What is wrong.
        reason: String,
    },
    /// Any other transfer failure (after the configured retries).
    #[error("{url}: {}", Printable(&source.to_string()))]
    Transfer {
        /// The URL.
        url: String,
        /// The client's error, which says how many retries were made.
        #[source]
        source: Box<object_store::Error>,
    },
    /// The file is not a valid safetensors file (or the caller's request does not fit it).
    #[error("{url}: {source}")]
    Format {
        /// The URL.
        url: String,
        /// The format error.
        #[source]
        source: tensafe::Error,
    },
    /// A write to a web server URL: http(s):// is read-only.
    #[error("{url}: web servers (http://, https://) are read-only for tensafe; write to s3://, gs:// or az:// instead")]
    ReadOnly {
        /// The URL.
        url: String,
    },
    /// The caller stopped the transfer (Ctrl-C); its requests were cancelled.
    #[error("the transfer was stopped (its requests were cancelled)")]
    Stopped,
    /// The blocking API was called from inside an async runtime.
    #[error("tensafe-remote's blocking API was called from inside an async runtime; call it from a plain thread (e.g. tokio::task::spawn_blocking)")]
    InsideRuntime,
}

/// `Result` with [`RemoteError`].
pub type Result<T, E = RemoteError> = std::result::Result<T, E>;

impl RemoteError {
    /// Whether the error says the object is missing (404).
    pub fn is_not_found(&self) -> bool {
        matches!(self, RemoteError::NotFound { .. })
    }

    pub(crate) fn format(url: &str, source: tensafe::Error) -> RemoteError {
        RemoteError::Format { url: url.to_owned(), source }
    }
}

impl From<RemoteError> for tensafe::Error {
    /// For callers that report every failure as a [`tensafe::Error`].
    fn from(e: RemoteError) -> tensafe::Error {
        match e {
            RemoteError::Format { url, source } => source.in_file(url),
            other => tensafe::Error::Io { context: "reading a remote object".into(), source: std::io::Error::other(other) },
        }
    }
}
