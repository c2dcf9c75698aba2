//! The error type of remote reads.
//!
//! Text that comes from a server (error bodies, status reasons) is shown
//! through [`Printable`], so that a hostile server cannot put terminal
//! control sequences or forged lines into a caller's messages and logs:
//! also down the `source()` chain, which error reporters print too
//! ([`ClientError`]).

use std::fmt;
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
    #[error("{url}: cannot configure the object store client: {source}")]
    Config {
        /// The URL.
        url: String,
        /// The client's error.
        #[source]
        source: ClientError,
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
    #[error("{url}: access denied (HTTP {status}): {}; {}", Printable(detail), credentials_hint(url))]
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
    /// The server answered a range request with something else than the
    /// range: the whole object (200 instead of 206), or another success
    /// status. The body is dropped unread.
    #[error("{url}: the server ignores HTTP Range requests (it answered {} instead of 206 Partial Content); tensafe refuses to download the whole object to read part of it; serve the file from a server with range support (S3-compatible stores, nginx, Apache, …)", if *status == 200 { "200 with the whole object".to_owned() } else { status.to_string() })]
    RangeIgnored {
        /// The URL.
        url: String,
        /// The status it answered with.
        status: u16,
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
    #[error("{url}: the response for bytes {}..{} broke off after {received} bytes{}: {}", range.start, range.end, if *attempts > 1 { format!(" ({attempts} tries)") } else { String::new() }, source)]
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
        source: ClientError,
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
    #[error("{url}: {source}")]
    Transfer {
        /// The URL.
        url: String,
        /// The client's error, which says how many retries were made.
        #[source]
        source: ClientError,
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

/// An error of the object store client, as tensafe-remote shows it: its
/// text, and the text of every error under it, escaped ([`Printable`]), since
/// servers write part of it. [`ClientError::get`] gives the error itself.
#[derive(Debug)]
pub struct ClientError {
    error: Box<object_store::Error>,
    /// The escaped texts of the errors under `error`, nearest first.
    causes: Option<Box<EscapedCause>>,
}

impl ClientError {
    pub(crate) fn new(error: object_store::Error) -> ClientError {
        let mut texts = Vec::new();
        let mut under = std::error::Error::source(&error);
        while let Some(cause) = under {
            texts.push(Printable(&cause.to_string()).to_string());
            under = cause.source();
        }
        let causes = texts.into_iter().rev().fold(None, |next, text| Some(Box::new(EscapedCause { text, next })));
        ClientError { error: Box::new(error), causes }
    }

    /// The client's error as it came, its text unescaped.
    pub fn get(&self) -> &object_store::Error {
        &self.error
    }
}

impl fmt::Display for ClientError {
    /// The client's text, and the first cause's where it adds to it (the
    /// client says "error sending request"; its cause, "Connection refused").
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.error.to_string();
        write!(f, "{}", Printable(&text))?;
        let root = std::iter::successors(self.causes.as_deref(), |cause| cause.next.as_deref()).last();
        match root {
            Some(root) if !text.contains(&root.text) => write!(f, " ({})", root.text),
            _ => Ok(()),
        }
    }
}

/// What to check when a store refuses access to `url`: the credentials its
/// scheme reads from the environment; a web server gets none.
fn credentials_hint(url: &str) -> &'static str {
    match crate::store::Scheme::of(url) {
        Some(crate::store::Scheme::S3) => "check the credentials in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN)",
        Some(crate::store::Scheme::Gcs) => "check the credentials in the environment (GOOGLE_APPLICATION_CREDENTIALS, GOOGLE_SERVICE_ACCOUNT)",
        Some(crate::store::Scheme::Azure) => {
            "check the credentials in the environment (AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY or AZURE_STORAGE_SAS_KEY)"
        }
        Some(crate::store::Scheme::Http) => "the web server refuses it (tensafe sends no credentials to http(s):// URLs)",
        None => "check the credentials",
    }
}

/// A server's explanation as a message carries it: an HTML error page in it
/// (web servers send one with a 404 or 403) is cut off, and the rest kept
/// to a few hundred characters.
pub(crate) fn server_detail(text: &str) -> String {
    const MAX: usize = 1000;
    let lower = text.to_ascii_lowercase();
    let page = ["<!doctype", "<html"].iter().filter_map(|tag| lower.find(tag)).min();
    let (kept, tail) = match page {
        Some(at) => (text[..at].trim_end().trim_end_matches(':'), " (an HTML error page)"),
        None => (text.trim_end(), ""),
    };
    match kept.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…{tail}", &kept[..cut]),
        None => format!("{kept}{tail}"),
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.causes.as_deref().map(|cause| cause as &(dyn std::error::Error + 'static))
    }
}

/// One escaped link of a [`ClientError`]'s chain.
#[derive(Debug)]
struct EscapedCause {
    text: String,
    next: Option<Box<EscapedCause>>,
}

impl fmt::Display for EscapedCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for EscapedCause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.next.as_deref().map(|cause| cause as &(dyn std::error::Error + 'static))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_html_error_page_is_cut_from_the_detail_and_long_text_shortened() {
        let nginx = "Server returned non-2xx status code: 404 Not Found: <html>\r\n<head><title>404 Not Found</title></head>\r\n</html>\r\n";
        assert_eq!(server_detail(nginx), "Server returned non-2xx status code: 404 Not Found (an HTML error page)");
        assert_eq!(server_detail("403 Forbidden: <!DOCTYPE HTML PUBLIC>…"), "403 Forbidden (an HTML error page)");
        let xml = "403 Forbidden: <?xml version=\"1.0\"?><Error><Code>AccessDenied</Code></Error>";
        assert_eq!(server_detail(xml), xml, "a store's XML error says what is wrong: kept");
        let long = "é".repeat(5000);
        assert_eq!(server_detail(&long), format!("{}…", "é".repeat(1000)));
    }

    #[test]
    fn access_denied_says_what_to_check_for_the_urls_scheme() {
        let denied = |url: &str| RemoteError::Forbidden { url: url.into(), status: 403, detail: "no".into() }.to_string();
        assert!(denied("s3://b/k").contains("AWS_SECRET_ACCESS_KEY") && !denied("s3://b/k").contains("GOOGLE"));
        assert!(denied("gs://b/k").contains("GOOGLE_APPLICATION_CREDENTIALS") && !denied("gs://b/k").contains("AWS"));
        assert!(denied("az://c/k").contains("AZURE_STORAGE_ACCOUNT_KEY") && denied("ABFSS://c/k").contains("AZURE"));
        let web = denied("https://example.invalid/k");
        assert!(web.contains("sends no credentials") && !web.contains("AWS") && !web.contains("AZURE"), "{web}");
    }

    #[test]
    fn a_client_error_shows_its_root_cause_when_the_text_leaves_it_out() {
        // As the HTTP client words it: the request failed, the cause under it.
        #[derive(Debug)]
        struct Sending(std::io::Error);
        impl fmt::Display for Sending {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("error sending request")
            }
        }
        impl std::error::Error for Sending {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let root = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused (os error 111)");
        let error = ClientError::new(object_store::Error::Generic { store: "HTTP", source: Box::new(Sending(root)) });
        let text = error.to_string();
        assert!(text.ends_with("(Connection refused (os error 111))"), "{text}");
        assert_eq!(text.matches("Connection refused").count(), 1, "{text}");
    }
}
