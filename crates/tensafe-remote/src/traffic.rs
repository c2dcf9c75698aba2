//! Counting what goes over the wire, and the HTTP layer that counts it.
//!
//! Every request the object store client sends (retries and HEADs included)
//! passes through [`InstrumentedConnector`]'s service, which counts it and the
//! response body bytes as they arrive, into the process-wide counter and into
//! the counters of the [`Probe`] that tensafe attaches to its own requests.
//! The same layer detects servers that ignore `Range` (and drops their body
//! unread) and honours `Retry-After` on 429/503 answers.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body::{Body, Frame, SizeHint};
use object_store::client::{HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpResponseBody, HttpService};
use object_store::ClientOptions;

use crate::client::Redirects;

/// Requests made, response body bytes received and request body bytes sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// HTTP requests sent (each retry counts).
    pub requests: u64,
    /// Response body bytes received (error bodies and retried bytes included).
    pub bytes: u64,
    /// Request body bytes sent (uploads; counted as each request starts,
    /// retries included). The parts of a multipart upload count only in
    /// [`global_traffic`]: object_store sends them without tensafe's probe.
    pub sent: u64,
}

impl std::ops::Sub for Traffic {
    type Output = Traffic;
    fn sub(self, earlier: Traffic) -> Traffic {
        Traffic { requests: self.requests - earlier.requests, bytes: self.bytes - earlier.bytes, sent: self.sent - earlier.sent }
    }
}

impl std::ops::Add for Traffic {
    type Output = Traffic;
    fn add(self, other: Traffic) -> Traffic {
        Traffic { requests: self.requests + other.requests, bytes: self.bytes + other.bytes, sent: self.sent + other.sent }
    }
}

/// A shared, thread-safe traffic counter. Clones count into the same totals.
///
/// Give one to [`RemoteOptions::counter`](crate::RemoteOptions::counter) to
/// total several files (e.g. everything one rank reads); every file also has
/// its own ([`RemoteFile::traffic`](crate::RemoteFile::traffic)), and
/// [`global_traffic`] totals the whole process.
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<CounterCells>);

#[derive(Debug, Default)]
struct CounterCells {
    requests: AtomicU64,
    bytes: AtomicU64,
    sent: AtomicU64,
}

impl Counter {
    /// A counter at zero.
    pub fn new() -> Counter {
        Counter::default()
    }

    /// The totals so far.
    pub fn traffic(&self) -> Traffic {
        Traffic {
            requests: self.0.requests.load(Ordering::Relaxed),
            bytes: self.0.bytes.load(Ordering::Relaxed),
            sent: self.0.sent.load(Ordering::Relaxed),
        }
    }

    fn add_request(&self, body_bytes: u64) {
        self.0.requests.fetch_add(1, Ordering::Relaxed);
        self.0.sent.fetch_add(body_bytes, Ordering::Relaxed);
    }

    fn add_bytes(&self, n: u64) {
        self.0.bytes.fetch_add(n, Ordering::Relaxed);
    }
}

static GLOBAL: std::sync::LazyLock<Counter> = std::sync::LazyLock::new(Counter::new);

/// Everything tensafe-remote sent and received in this process so far
/// (credential requests included).
pub fn global_traffic() -> Traffic {
    GLOBAL.traffic()
}

/// Attached to tensafe's requests (as an `http::Extensions` value that the
/// object store client passes through): where to count, and what the HTTP
/// layer saw.
#[derive(Debug, Clone)]
pub(crate) struct Probe(Arc<ProbeState>);

#[derive(Debug)]
struct ProbeState {
    counters: Vec<Counter>,
    retry_after_cap: Duration,
    range_ignored: AtomicBool,
    last_status: AtomicU16,
    /// Content-Length of a 200 answer to a range request (`u64::MAX`: none).
    whole_len: AtomicU64,
    /// Where the last redirect that was not followed pointed.
    redirected_to: std::sync::Mutex<Option<String>>,
}

impl Probe {
    pub(crate) fn new(counters: Vec<Counter>, retry_after_cap: Duration) -> Probe {
        Probe(Arc::new(ProbeState { counters, retry_after_cap, range_ignored: AtomicBool::new(false), last_status: AtomicU16::new(0), whole_len: AtomicU64::new(u64::MAX), redirected_to: Default::default() }))
    }

    /// Whether a range request got a 200 answer.
    pub(crate) fn range_ignored(&self) -> bool {
        self.0.range_ignored.load(Ordering::Relaxed)
    }

    /// The object's length, when a range request was answered with all of it.
    pub(crate) fn whole_object_len(&self) -> Option<u64> {
        Some(self.0.whole_len.load(Ordering::Relaxed)).filter(|&n| n != u64::MAX)
    }

    /// Status of the last response (0 before any).
    pub(crate) fn last_status(&self) -> u16 {
        self.0.last_status.load(Ordering::Relaxed)
    }

    /// The `Location` of a redirect answer that came back to the client
    /// (one the redirect rule did not follow).
    pub(crate) fn redirected_to(&self) -> Option<String> {
        self.0.redirected_to.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    pub(crate) fn extensions(&self) -> http::Extensions {
        let mut extensions = http::Extensions::new();
        extensions.insert(self.clone());
        extensions
    }

    fn add_request(&self, body_bytes: u64) {
        self.0.counters.iter().for_each(|c| c.add_request(body_bytes));
    }

    fn add_bytes(&self, n: u64) {
        self.0.counters.iter().for_each(|c| c.add_bytes(n));
    }
}

/// Builds object store clients whose requests go through [`Instrumented`],
/// on a client that follows `redirects`.
#[derive(Debug)]
pub(crate) struct InstrumentedConnector {
    pub redirects: Redirects,
}

impl HttpConnector for InstrumentedConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = crate::client::build(options, self.redirects)?;
        Ok(HttpClient::new(Instrumented { inner: HttpClient::new(inner), redirects: self.redirects }))
    }
}

#[derive(Debug)]
struct Instrumented {
    inner: HttpClient,
    /// The rule the inner client follows redirects by.
    redirects: Redirects,
}

/// Most bytes of an error answer's body that are read (object_store puts the
/// whole body into its error message; a hostile server could send gigabytes).
const ERROR_BODY_LIMIT: u64 = 16 << 10;

/// Most bytes of a successful answer to a request that is not a GET (an
/// upload's XML: S3's CreateMultipartUpload and CompleteMultipartUpload
/// answers take under a KiB), which object_store reads whole into memory;
/// past it the answer is an error. GETs are bounded by what they ask for.
const ANSWER_BODY_LIMIT: u64 = 1 << 20;

/// Longest `Retry-After` that is honoured when no probe says otherwise.
const DEFAULT_RETRY_AFTER_CAP: Duration = Duration::from_secs(10);

#[async_trait::async_trait]
impl HttpService for Instrumented {
    async fn call(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let probe = request.extensions().get::<Probe>().cloned();
        let ranged = request.headers().contains_key(http::header::RANGE);
        let reads_object = request.method() == http::Method::GET;
        let sent_to = request.uri().clone();
        let body_bytes = request.body().content_length() as u64;
        GLOBAL.add_request(body_bytes);
        if let Some(p) = &probe {
            p.add_request(body_bytes);
        }
        let mut response = self.inner.execute(request).await?;
        let status = response.status();
        if let Some(p) = &probe {
            p.0.last_status.store(status.as_u16(), Ordering::Relaxed);
            // Read only with a 3xx last status: set for each 3xx answer.
            if status.is_redirection() && self.redirects == Redirects::SameOrigin {
                *p.0.redirected_to.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = elsewhere(&sent_to, response.headers());
            }
        }
        if ranged && status == StatusCode::OK {
            // The whole object is coming: drop the body unread (closing the
            // connection) and let the client report the missing 206.
            if let Some(p) = &probe {
                p.0.range_ignored.store(true, Ordering::Relaxed);
                let length = response.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok());
                p.0.whole_len.store(length.unwrap_or(u64::MAX), Ordering::Relaxed);
            }
            let (parts, _whole_object) = response.into_parts();
            return Ok(HttpResponse::from_parts(parts, HttpResponseBody::from(Bytes::new())));
        }
        if ranged
            && status == StatusCode::PARTIAL_CONTENT
            && let Some(value) = response.headers().get(http::header::CONTENT_RANGE)
        {
            let Some(range) = content_range(value.as_bytes()) else {
                // Checked here, not retried: object_store computes `LAST + 1`,
                // which overflows on `bytes 0-18446744073709551615/…`.
                let shown = tensafe::Printable(&String::from_utf8_lossy(value.as_bytes())).to_string();
                let message = format!("the server sent an invalid Content-Range header \"{shown}\" (tensafe needs `bytes FIRST-LAST/SIZE` with FIRST ≤ LAST < SIZE)");
                return Err(HttpError::new(HttpErrorKind::Decode, std::io::Error::other(message)));
            };
            // A chunked answer has no Content-Length, which object_store
            // requires; the range gives it (and the body is checked against it).
            if !response.headers().contains_key(http::header::CONTENT_LENGTH) {
                response.headers_mut().insert(http::header::CONTENT_LENGTH, (range.end - range.start).into());
            }
        }
        if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
            // The client retries these with its own backoff; wait first as long
            // as the server asked (bounded), so a retry does not come too early.
            let cap = probe.as_ref().map_or(DEFAULT_RETRY_AFTER_CAP, |p| p.0.retry_after_cap);
            if let Some(wait) = retry_after(response.headers()) {
                tokio::time::sleep(wait.min(cap)).await;
            }
        }
        let (parts, body) = response.into_parts();
        let (left, past_limit) = match () {
            _ if status.is_client_error() || status.is_server_error() => (ERROR_BODY_LIMIT, PastLimit::Cut),
            _ if !reads_object => (ANSWER_BODY_LIMIT, PastLimit::Fail),
            _ => (u64::MAX, PastLimit::Cut),
        };
        Ok(HttpResponse::from_parts(parts, HttpResponseBody::new(CountingBody { inner: Some(body), probe, left, past_limit })))
    }
}

/// Where a redirect answer to a request sent to `sent_to` points, when that
/// is another origin (not when same-origin redirects ran out of hops).
fn elsewhere(sent_to: &http::Uri, headers: &http::HeaderMap) -> Option<String> {
    let location = String::from_utf8_lossy(headers.get(http::header::LOCATION)?.as_bytes()).into_owned();
    let sent_to = url::Url::parse(&sent_to.to_string()).ok()?;
    let same_origin = sent_to.join(&location).is_ok_and(|target| target.origin() == sent_to.origin());
    (!same_origin).then_some(location)
}

/// The byte range of a `Content-Range` value `bytes FIRST-LAST/SIZE` with
/// `FIRST ≤ LAST < SIZE`, as `FIRST..LAST + 1` (an unknown size, `/*`, is
/// not accepted: tensafe learns object sizes from this header).
fn content_range(value: &[u8]) -> Option<std::ops::Range<u64>> {
    let number = |text: &str| -> Option<u64> { text.bytes().all(|b| b.is_ascii_digit()).then(|| text.parse().ok()).flatten() };
    let text = std::str::from_utf8(value).ok()?.trim().strip_prefix("bytes ")?;
    let (range, size) = text.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let (first, last, size) = (number(first)?, number(last)?, number(size)?);
    (first <= last && last < size).then(|| first..last + 1)
}

/// `Retry-After` in seconds (the HTTP-date form is not used by object stores).
fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let seconds: u64 = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(seconds))
}

/// A response body that counts its data bytes as they are received, and
/// stops after `left` bytes (the rest is dropped unread with the connection).
struct CountingBody {
    /// `None` once the limit is reached.
    inner: Option<HttpResponseBody>,
    probe: Option<Probe>,
    left: u64,
    past_limit: PastLimit,
}

/// What a body longer than its limit becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PastLimit {
    /// Cut at the limit (an error's text: its start says enough).
    Cut,
    /// An error (an answer that must be read whole to be understood).
    Fail,
}

impl Body for CountingBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        let this = self.get_mut();
        let Some(inner) = &mut this.inner else { return Poll::Ready(None) };
        let mut poll = Pin::new(inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &mut poll
            && let Some(data) = frame.data_mut()
        {
            let n = data.len() as u64;
            GLOBAL.add_bytes(n);
            if let Some(p) = &this.probe {
                p.add_bytes(n);
            }
            if n > this.left && this.past_limit == PastLimit::Fail {
                this.inner = None;
                let message = format!("the server's answer has more than {ANSWER_BODY_LIMIT} bytes, far more than this request's answer takes");
                return Poll::Ready(Some(Err(HttpError::new(HttpErrorKind::Decode, std::io::Error::other(message)))));
            }
            // A failing body that reached its limit exactly goes on: only a
            // byte past it is an error (cut there, the answer was read as
            // complete and misparsed).
            if n >= this.left && this.past_limit == PastLimit::Cut {
                // Cut where a character starts, so that a UTF-8 body stays
                // UTF-8 (object_store drops a body that is not, status and all).
                let mut cut = this.left as usize;
                while cut > 0 && data.get(cut).is_some_and(|b| b & 0xc0 == 0x80) {
                    cut -= 1;
                }
                data.truncate(cut);
                this.inner = None;
            } else {
                this.left -= n;
            }
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|inner| inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let Some(inner) = &self.inner else { return SizeHint::with_exact(0) };
        let mut hint = inner.size_hint();
        if hint.upper().is_none_or(|upper| upper > self.left) {
            let lower = hint.lower().min(self.left);
            hint = SizeHint::new();
            hint.set_lower(lower);
            hint.set_upper(self.left);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_only() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(http::header::RETRY_AFTER, " 3 ".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
        headers.insert(http::header::RETRY_AFTER, "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap());
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn content_ranges_must_be_complete_and_in_order() {
        for (good, range) in [("bytes 0-0/1", 0..1), (" bytes 5-9/10 ", 5..10), ("bytes 0-18446744073709551614/18446744073709551615", 0..u64::MAX)] {
            assert_eq!(content_range(good.as_bytes()), Some(range), "{good}");
        }
        let bad = [
            "bytes 0-18446744073709551615/18446744073709551615", // LAST + 1 overflows
            "bytes 0-18446744073709551615/5",
            "bytes 0-9/*",
            "bytes 9-0/10",
            "bytes 0-10/10",
            "bytes +0-9/10",
            "bytes 0-9/10/",
            "0-9/10",
            "bytes -9/10",
            "bytes 0-99999999999999999999/1",
        ];
        for value in bad {
            assert_eq!(content_range(value.as_bytes()), None, "{value}");
        }
        assert_eq!(content_range(b"bytes 0-9/1\xff0"), None);
    }

    #[test]
    fn error_bodies_end_at_the_limit_on_a_character_boundary() {
        // 16 KiB of "é" (2 bytes each) after one "x": the limit falls inside a character.
        let text: String = std::iter::once('x').chain(std::iter::repeat_n('é', 20_000)).collect();
        let mut body = CountingBody { inner: Some(HttpResponseBody::from(Bytes::from(text))), probe: None, left: ERROR_BODY_LIMIT, past_limit: PastLimit::Cut };
        let mut read = Vec::new();
        crate::store::block_on(async {
            while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                read.extend_from_slice(frame.unwrap().data_ref().unwrap());
            }
        })
        .unwrap();
        assert_eq!(read.len() as u64, ERROR_BODY_LIMIT - 1);
        assert!(std::str::from_utf8(&read).is_ok() && body.is_end_stream());
    }

    /// A body of the given frames.
    struct Frames(std::collections::VecDeque<Bytes>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = HttpError;

        fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
            Poll::Ready(self.get_mut().0.pop_front().map(|data| Ok(Frame::data(data))))
        }
    }

    /// Reads a failing body of `frames` with a limit of `limit` bytes.
    fn read_failing(frames: &[usize], limit: u64) -> Result<Vec<u8>, HttpError> {
        let frames = Frames(frames.iter().map(|&n| Bytes::from(vec![b'a'; n])).collect());
        let mut body = CountingBody { inner: Some(HttpResponseBody::new(frames)), probe: None, left: limit, past_limit: PastLimit::Fail };
        let mut read = Vec::new();
        crate::store::block_on(async {
            while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                read.extend_from_slice(frame?.data_ref().expect("data frames"));
            }
            Ok(read)
        })
        .unwrap()
    }

    #[test]
    fn answers_past_their_limit_fail_wherever_a_frame_ends() {
        assert_eq!(read_failing(&[60, 40], 100).unwrap().len(), 100);
        assert_eq!(read_failing(&[100], 100).unwrap().len(), 100);
        for frames in [&[60, 41][..], &[101], &[100, 1], &[60, 40, 5]] {
            let error = read_failing(frames, 100).expect_err("past the limit");
            assert!(error.to_string().contains("more than"), "{frames:?}: {error}");
        }
    }

    #[test]
    fn counters_add_up() {
        let (a, b) = (Counter::new(), Counter::new());
        let probe = Probe::new(vec![a.clone(), b.clone()], Duration::ZERO);
        probe.add_request(7);
        probe.add_bytes(10);
        probe.add_bytes(5);
        assert_eq!(a.traffic(), Traffic { requests: 1, bytes: 15, sent: 7 });
        let earlier = Traffic { requests: 1, bytes: 5, sent: 7 };
        assert_eq!(b.traffic() - earlier, Traffic { requests: 0, bytes: 10, sent: 0 });
        assert_eq!(earlier + earlier, Traffic { requests: 2, bytes: 10, sent: 14 });
    }
}
