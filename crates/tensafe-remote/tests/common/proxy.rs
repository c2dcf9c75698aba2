//! A fault-injecting HTTP/1.1 proxy on 127.0.0.1: forwards each request to an
//! upstream server (one request per connection), then passes the response on
//! or damages it as scheduled.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What to do to one response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Pass it on.
    None,
    /// Wait this long, then pass it on.
    Delay(Duration),
    /// Answer 503 Service Unavailable with `Retry-After: seconds` instead.
    Unavailable { retry_after: u64 },
    /// Send the headers and only `keep` bytes of the body, then close.
    Truncate { keep: usize },
    /// Send the headers and `keep` bytes of the body, then nothing for a
    /// minute.
    Stall { keep: usize },
    /// Declare (and send) only half the body in Content-Length, keeping
    /// Content-Range: a complete-looking response that is too short.
    HalfLength,
    /// Declare twice the body's length, send the body, close.
    DoubleLength,
    /// Shift Content-Range by one byte (the body is the asked range).
    WrongContentRange,
    /// Content-Range with a last byte of 2^64 - 1 (the body is the asked range).
    HugeContentRange,
    /// Content-Range with a total one byte larger: the object grew.
    OtherTotal,
    /// Send the body in chunks (`Transfer-Encoding: chunked`), without
    /// Content-Length.
    Chunked,
    /// As `Chunked`, then `extra` bytes more than Content-Range says.
    ChunkedTooLong { extra: usize },
    /// Close the connection without answering.
    Reset,
    /// Answer with this status and a short body instead.
    Status(u16),
    /// Answer with this status and a body of `len` bytes that holds terminal
    /// escapes and line breaks.
    HostileStatus { status: u16, len: usize },
    /// Pass it on with another ETag: a server that serves another version
    /// of the object whatever If-Match says.
    OtherETag,
    /// Pass it on with the ETag made weak (`W/"…"`), as some servers and
    /// proxies that compress or transform send it.
    WeakETag,
    /// Answer `307 Temporary Redirect` to the same path on `origin`
    /// (`http://host:port`).
    Redirect { origin: String },
    /// Answer `204 No Content`.
    NoContent,
    /// Pass it on without its ETag (its Last-Modified kept), as a server
    /// that sends no ETags.
    NoETag,
    /// As `NoETag`, with another Last-Modified time: another version.
    NoETagOtherDate,
}

/// What the proxy saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub request_line: String,
    pub range: Option<String>,
    /// The request's header lines, as sent.
    pub head: String,
    pub fault: Fault,
    /// When the request arrived.
    pub at: Instant,
}

#[derive(Default)]
struct Shared {
    schedule: Mutex<VecDeque<Fault>>,
    /// Applied when the schedule is empty.
    steady: Mutex<Option<Fault>>,
    seen: Mutex<Vec<Seen>>,
    stop: AtomicBool,
}

/// The proxy; stops when dropped.
pub struct FaultProxy {
    pub port: u16,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    pub fn start(upstream_port: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let shared = Arc::new(Shared::default());
        let state = shared.clone();
        let thread = std::thread::spawn(move || {
            while !state.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let state = state.clone();
                        std::thread::spawn(move || {
                            let _ = client.set_nonblocking(false);
                            let _ = serve(client, upstream_port, &state);
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                    Err(_) => return,
                }
            }
        });
        FaultProxy { port, shared, thread: Some(thread) }
    }

    /// Faults for the next responses, in order.
    pub fn schedule(&self, faults: impl IntoIterator<Item = Fault>) {
        self.shared.schedule.lock().unwrap().extend(faults);
    }

    /// The fault for every response once the schedule is used up (`None`: pass on).
    pub fn set_steady(&self, fault: Option<Fault>) {
        *self.shared.steady.lock().unwrap() = fault;
    }

    /// Forgets the schedule, the steady fault and what was seen.
    pub fn reset(&self) {
        self.shared.schedule.lock().unwrap().clear();
        *self.shared.steady.lock().unwrap() = None;
        self.shared.seen.lock().unwrap().clear();
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    Ok(head)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Headers without `names` (case-insensitive), status line included.
fn without(head: &str, names: &[&str]) -> String {
    head.trim_end()
        .lines()
        .filter(|line| !line.split_once(':').is_some_and(|(k, _)| names.iter().any(|n| k.trim().eq_ignore_ascii_case(n))))
        .map(|l| format!("{l}\r\n"))
        .collect()
}

fn serve(mut client: TcpStream, upstream_port: u16, state: &Shared) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let head = String::from_utf8_lossy(&read_head(&mut client)?).into_owned();
    let at = Instant::now();
    let fault = {
        let next = state.schedule.lock().unwrap().pop_front();
        next.or_else(|| state.steady.lock().unwrap().clone()).unwrap_or(Fault::None)
    };
    state.seen.lock().unwrap().push(Seen {
        request_line: head.lines().next().unwrap_or_default().to_owned(),
        range: header(&head, "range").map(str::to_owned),
        head: head.clone(),
        fault: fault.clone(),
        at,
    });
    match &fault {
        Fault::Reset => return Ok(()),
        Fault::Status(code) => {
            let body = format!("injected status {code}");
            return write!(client, "HTTP/1.1 {code} Injected\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        }
        Fault::NoContent => return write!(client, "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"),
        Fault::Redirect { origin } => {
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            return write!(client, "HTTP/1.1 307 Temporary Redirect\r\nLocation: {origin}{path}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
        Fault::HostileStatus { status, len } => {
            write!(client, "HTTP/1.1 {status} Hostile\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n")?;
            let block = b"\x1b[2J\x1b[31mforged log line\r\n".repeat(2048);
            return send_repeated(&block, *len, |piece| client.write_all(piece));
        }
        Fault::Unavailable { retry_after } => {
            let body = "upstream busy";
            return write!(
                client,
                "HTTP/1.1 503 Service Unavailable\r\nRetry-After: {retry_after}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
        _ => {}
    }
    // Forward with one request per upstream connection.
    let mut upstream = TcpStream::connect(("127.0.0.1", upstream_port))?;
    upstream.write_all(without(&head, &["connection"]).as_bytes())?;
    upstream.write_all(b"Connection: close\r\n\r\n")?;
    let mut response = Vec::new();
    upstream.read_to_end(&mut response)?;
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").map_or(response.len(), |p| p + 4);
    let (status_and_headers, body) = response.split_at(split);
    let up_head = String::from_utf8_lossy(status_and_headers).into_owned();
    let base = without(&up_head, &["connection", "content-length"]);
    let send = |client: &mut TcpStream, extra: &str, body: &[u8]| -> std::io::Result<()> {
        client.write_all(base.as_bytes())?;
        client.write_all(extra.as_bytes())?;
        client.write_all(b"Connection: close\r\n\r\n")?;
        client.write_all(body)?;
        client.flush()
    };
    match fault {
        Fault::None | Fault::Reset | Fault::Unavailable { .. } | Fault::Status(_) | Fault::HostileStatus { .. } | Fault::Redirect { .. } | Fault::NoContent => {
            send(&mut client, &format!("Content-Length: {}\r\n", body.len()), body)
        }
        Fault::NoETag => send_without_etag(&mut client, &base, body, None),
        Fault::NoETagOtherDate => send_without_etag(&mut client, &base, body, Some("Tue, 02 Jan 2024 00:00:00 GMT")),
        Fault::OtherETag => {
            let base = without(&base, &["etag"]);
            client.write_all(base.as_bytes())?;
            write!(client, "ETag: \"another-version\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())?;
            client.write_all(body)
        }
        Fault::WeakETag => {
            let etag = header(&up_head, "etag").unwrap_or("\"none\"");
            client.write_all(without(&base, &["etag"]).as_bytes())?;
            write!(client, "ETag: W/{etag}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())?;
            client.write_all(body)
        }
        Fault::Delay(d) => {
            std::thread::sleep(d);
            send(&mut client, &format!("Content-Length: {}\r\n", body.len()), body)
        }
        Fault::Chunked | Fault::ChunkedTooLong { .. } => {
            let extra = if let Fault::ChunkedTooLong { extra } = fault { extra } else { 0 };
            client.write_all(base.as_bytes())?;
            client.write_all(b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")?;
            let mut send_chunk = |chunk: &[u8]| -> std::io::Result<()> {
                write!(client, "{:x}\r\n", chunk.len())?;
                client.write_all(chunk)?;
                client.write_all(b"\r\n")
            };
            for chunk in body.chunks(64 << 10) {
                send_chunk(chunk)?;
            }
            send_repeated(&[0u8; 64 << 10], extra, &mut send_chunk)?;
            client.write_all(b"0\r\n\r\n")
        }
        Fault::Stall { keep } => {
            send(&mut client, &format!("Content-Length: {}\r\n", body.len()), &body[..keep.min(body.len())])?;
            std::thread::sleep(Duration::from_secs(60));
            Ok(())
        }
        Fault::Truncate { keep } => send(&mut client, &format!("Content-Length: {}\r\n", body.len()), &body[..keep.min(body.len())]),
        Fault::HalfLength => send(&mut client, &format!("Content-Length: {}\r\n", body.len() / 2), &body[..body.len() / 2]),
        Fault::DoubleLength => send(&mut client, &format!("Content-Length: {}\r\n", body.len() * 2), body),
        Fault::WrongContentRange => send_content_range(&mut client, &up_head, body, |a, b, total| format!("bytes {}-{}/{total}", a + 1, b + 1)),
        Fault::HugeContentRange => send_content_range(&mut client, &up_head, body, |a, _, total| format!("bytes {a}-{}/{total}", u64::MAX)),
        Fault::OtherTotal => send_content_range(&mut client, &up_head, body, |a, b, total| format!("bytes {a}-{b}/{}", total + 1)),
    }
}

/// Sends the upstream answer (`base`: its status and headers, without
/// Connection and Content-Length) without its ETag, and with
/// `last_modified` instead of its Last-Modified if given.
fn send_without_etag(client: &mut TcpStream, base: &str, body: &[u8], last_modified: Option<&str>) -> std::io::Result<()> {
    let dropped: &[&str] = if last_modified.is_some() { &["etag", "last-modified"] } else { &["etag"] };
    client.write_all(without(base, dropped).as_bytes())?;
    if let Some(date) = last_modified {
        write!(client, "Last-Modified: {date}\r\n")?;
    }
    write!(client, "Content-Length: {}\r\nConnection: close\r\n\r\n", body.len())?;
    client.write_all(body)
}

/// Sends the upstream answer with its Content-Range `bytes A-B/TOTAL`
/// replaced by `rewrite(A, B, TOTAL)`.
fn send_content_range(client: &mut TcpStream, up_head: &str, body: &[u8], rewrite: impl Fn(u64, u64, u64) -> String) -> std::io::Result<()> {
    let rewritten = header(up_head, "content-range").and_then(|cr| {
        let (range, total) = cr.strip_prefix("bytes ")?.split_once('/')?;
        let (a, b) = range.split_once('-')?;
        Some(rewrite(a.parse().ok()?, b.parse().ok()?, total.parse().ok()?))
    });
    let base = without(up_head, &["connection", "content-length", "content-range"]);
    client.write_all(base.as_bytes())?;
    if let Some(cr) = rewritten {
        write!(client, "Content-Range: {cr}\r\n")?;
    }
    write!(client, "Content-Length: {}\r\nConnection: close\r\n\r\n", body.len())?;
    client.write_all(body)
}

/// Sends `len` bytes of `block` repeated, a block at a time, as they are
/// made: a large hostile body built whole first (tens of MiB in a debug
/// build) once came after the client's 2 s timeout.
fn send_repeated(block: &[u8], len: usize, mut send: impl FnMut(&[u8]) -> std::io::Result<()>) -> std::io::Result<()> {
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len());
        send(&block[..n])?;
        left -= n;
    }
    Ok(())
}
