//! The transfer engine: byte ranges of remote objects → places in a buffer,
//! as coalesced, concurrent range requests streamed straight into place.
//!
//! 1. Pieces are checked against their object's size and carved out of the
//!    destination (no overlaps), then cut to at most `chunk_bytes`.
//! 2. Pieces of the same object are merged into one request when the gap
//!    between them is at most `merge_gap` (the gap's bytes are fetched and
//!    dropped) and the request stays within `chunk_bytes`.
//! 3. At most `concurrency` requests are in flight. Each response body is
//!    copied into its pieces as it arrives, so memory beyond the destination
//!    stays at the HTTP buffers: bytes in flight ≤ `concurrency × chunk_bytes`.
//! 4. Every response must carry exactly the bytes asked for: a short or long
//!    body is discarded and the request retried with backoff, then reported.

use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectStore};

use crate::error::{ClientError, RemoteError, Result};
use crate::traffic::{Counter, Probe, Traffic};
use crate::RemoteOptions;

/// Everything a request needs to know about the object it reads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Object<'a> {
    pub url: &'a str,
    pub store: &'a dyn ObjectStore,
    pub path: &'a Path,
    pub size: u64,
    /// The version opened, checked on every answer and sent as a condition
    /// (`If-Match`, `If-Unmodified-Since`), so that a replaced object is
    /// noticed, not mixed in.
    pub version: Option<&'a Version>,
    /// Where this object's traffic is counted (besides the process total).
    pub counters: &'a [Counter],
}

/// What tells one version of an object from another: its ETag, or where
/// the server sends none, its Last-Modified time (whole seconds: a file
/// replaced within the same second by one of the same size goes unseen).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Version {
    ETag(String),
    LastModified(chrono::DateTime<chrono::Utc>),
}

impl Version {
    /// The version an answer names, if any (object_store gives the Unix
    /// epoch for a missing Last-Modified).
    pub(crate) fn of(meta: &object_store::ObjectMeta) -> Option<Version> {
        match &meta.e_tag {
            Some(etag) => Some(Version::ETag(etag.clone())),
            None if meta.last_modified.timestamp() != 0 => Some(Version::LastModified(meta.last_modified)),
            None => None,
        }
    }

    /// The ETag, if that is what this version is known by.
    pub(crate) fn etag(&self) -> Option<&str> {
        match self {
            Version::ETag(etag) => Some(etag),
            Version::LastModified(_) => None,
        }
    }
}

/// `len` bytes at `offset` of object `object` go to `dst_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub object: usize,
    pub offset: u64,
    pub dst_offset: usize,
    pub len: usize,
}

/// One range request and where its bytes go.
struct Job<'d> {
    object: usize,
    range: Range<u64>,
    /// (offset from `range.start`, destination), sorted, disjoint.
    targets: Vec<(u64, &'d mut [u8])>,
}

impl Job<'_> {
    fn useful_bytes(&self) -> u64 {
        self.targets.iter().map(|(_, d)| d.len() as u64).sum()
    }
}

/// The size limits of a transfer (from [`RemoteOptions`]).
#[derive(Debug, Clone, Copy)]
struct Limits {
    chunk: u64,
    gap: u64,
}

/// Groups pieces into requests over disjoint parts of `dst`.
fn plan<'d>(objects: &[Object<'_>], pieces: &[Piece], dst: &'d mut [u8], limits: Limits) -> Result<Vec<Job<'d>>> {
    let invalid = |reason: String| RemoteError::InvalidRequest { reason };
    let mut pieces: Vec<Piece> = pieces.iter().copied().filter(|p| p.len > 0).collect();
    for p in &pieces {
        let object = objects.get(p.object).ok_or_else(|| invalid(format!("no object #{}", p.object)))?;
        let end = p.offset.checked_add(p.len as u64).filter(|&end| end <= object.size);
        if end.is_none() {
            return Err(RemoteError::OutOfBounds { url: object.url.to_owned(), range: p.offset..p.offset.saturating_add(p.len as u64), size: object.size });
        }
    }
    // Carve the destination in destination order.
    pieces.sort_by_key(|p| p.dst_offset);
    let mut carved: Vec<(Piece, &'d mut [u8])> = Vec::with_capacity(pieces.len());
    let mut rest: &'d mut [u8] = dst;
    let mut consumed = 0usize;
    for p in pieces {
        let skip = p.dst_offset.checked_sub(consumed).ok_or_else(|| invalid("two ranges overlap in the destination".into()))?;
        if skip.checked_add(p.len).is_none_or(|need| need > rest.len()) {
            return Err(invalid(format!("a range ends at {} past the destination's {} bytes", p.dst_offset + p.len, consumed + rest.len())));
        }
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(skip);
        let (mut piece, tail) = tail.split_at_mut(p.len);
        rest = tail;
        consumed = p.dst_offset + p.len;
        // Cut into requests of at most `chunk` bytes.
        let mut offset = p.offset;
        while !piece.is_empty() {
            let n = piece.len().min(limits.chunk as usize);
            let (head, tail) = std::mem::take(&mut piece).split_at_mut(n);
            carved.push((Piece { offset, len: n, ..p }, head));
            offset += n as u64;
            piece = tail;
        }
    }
    // Merge neighbours in object order.
    carved.sort_by_key(|(p, _)| (p.object, p.offset));
    let mut jobs: Vec<Job<'d>> = Vec::new();
    for (p, slice) in carved {
        let end = p.offset + p.len as u64;
        match jobs.last_mut() {
            Some(job)
                if job.object == p.object
                    && p.offset >= job.range.end
                    && p.offset - job.range.end <= limits.gap
                    && end - job.range.start <= limits.chunk =>
            {
                job.targets.push((p.offset - job.range.start, slice));
                job.range.end = end;
            }
            _ => jobs.push(Job { object: p.object, range: p.offset..end, targets: vec![(0, slice)] }),
        }
    }
    Ok(jobs)
}

/// Reads every piece into `dst` with concurrent range requests.
///
/// `progress` gets the running total of bytes delivered into `dst`, as they
/// arrive (at least every MiB), and the total at the end.
/// Returns the traffic of this call alone.
pub(crate) async fn read_pieces(
    objects: &[Object<'_>],
    pieces: &[Piece],
    dst: &mut [u8],
    options: &RemoteOptions,
    progress: Option<&(dyn Fn(u64) + Sync)>,
) -> Result<Traffic> {
    let limits = Limits { chunk: options.chunk_bytes.max(1) as u64, gap: options.merge_gap as u64 };
    let jobs = plan(objects, pieces, dst, limits)?;
    let call = Counter::new();
    let progress = Progress { delivered: AtomicU64::new(0), callback: progress };
    let mut running = futures::stream::iter(jobs.into_iter().map(|job| {
        let (call, progress) = (call.clone(), &progress);
        async move { run(&objects[job.object], job, options, &call, progress).await }
    }))
    .buffer_unordered(options.concurrency.max(1));
    while let Some(done) = running.next().await {
        done?;
    }
    if let Some(callback) = progress.callback {
        callback(progress.delivered.load(Ordering::Relaxed));
    }
    Ok(call.traffic())
}

/// Bytes delivered so far by one call, reported as they arrive (each time
/// another MiB is complete, and once at the end).
struct Progress<'p> {
    delivered: AtomicU64,
    callback: Option<&'p (dyn Fn(u64) + Sync)>,
}

impl Progress<'_> {
    fn add(&self, n: u64) {
        let before = self.delivered.fetch_add(n, Ordering::Relaxed);
        if let Some(callback) = self.callback
            && (before + n) >> 20 != before >> 20
        {
            callback(before + n);
        }
    }

    /// Takes back what a failed try had delivered (it is fetched again).
    fn take_back(&self, n: u64) {
        self.delivered.fetch_sub(n, Ordering::Relaxed);
    }
}

/// Why one try of a request failed.
enum Failure {
    /// The body had another length than asked for (at least `received` bytes).
    Length { received: u64 },
    /// The body failed after `received` bytes.
    Body { received: u64, source: object_store::Error },
    /// The request failed.
    Store(object_store::Error),
    /// The response is of another version of the object (another ETag, or
    /// another total size).
    Changed { size: u64 },
    /// The tries ran out of time (`received` bytes in the last one).
    TimedOut { received: u64 },
}

/// The tries of one request whose body had the wrong length or broke off,
/// on top of the client's own retries: at most `retry.max_retries` more,
/// none that would start after `retry.retry_timeout`, and none still running
/// `retry.retry_timeout + timeout` after the first began. So a stalled server
/// costs minutes, not each try's whole retry budget again.
pub(crate) struct Tries<'o> {
    options: &'o RemoteOptions,
    started: tokio::time::Instant,
    /// Tries begun so far.
    pub attempts: u32,
}

impl<'o> Tries<'o> {
    pub(crate) fn new(options: &'o RemoteOptions) -> Tries<'o> {
        Tries { options, started: tokio::time::Instant::now(), attempts: 0 }
    }

    /// Runs the next try, cut off at the deadline (`None`: it was).
    pub(crate) async fn attempt<T>(&mut self, once: impl Future<Output = T>) -> Option<T> {
        self.attempts += 1;
        // No deadline when it is past what an Instant can hold.
        let budget = self.options.retry.retry_timeout.checked_add(self.options.timeout);
        match budget.and_then(|budget| self.started.checked_add(budget)) {
            Some(deadline) => tokio::time::timeout_at(deadline, once).await.ok(),
            None => Some(once.await),
        }
    }

    /// Waits before the next try; `false` when there is none left.
    pub(crate) async fn wait(&self) -> bool {
        let b = &self.options.retry.backoff;
        let wait = b.init_backoff.mul_f64(b.base.max(1.0).powi(self.attempts as i32 - 1)).min(b.max_backoff);
        if self.attempts > self.options.retry.max_retries as u32 || self.started.elapsed() + wait > self.options.retry.retry_timeout {
            return false;
        }
        tokio::time::sleep(wait).await;
        true
    }

    /// Time since the first try began.
    pub(crate) fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Runs one request (with retries) and returns the bytes it delivered.
async fn run(object: &Object<'_>, mut job: Job<'_>, options: &RemoteOptions, call: &Counter, progress: &Progress<'_>) -> Result<u64> {
    let useful = job.useful_bytes();
    let mut tries = Tries::new(options);
    loop {
        let mut counters = object.counters.to_vec();
        counters.push(call.clone());
        let probe = Probe::new(counters, options.max_retry_after);
        let mut delivered = 0;
        let failure = match tries.attempt(fetch_once(object, &mut job, &probe, progress, &mut delivered)).await {
            Some(Ok(())) => return Ok(useful),
            Some(Err(failure)) => failure,
            None => Failure::TimedOut { received: delivered },
        };
        progress.take_back(delivered);
        if matches!(failure, Failure::Store(_) | Failure::Changed { .. } | Failure::TimedOut { .. }) || !tries.wait().await {
            return Err(failure.into_error(object, &probe, job.range.clone(), &tries));
        }
    }
}

impl Failure {
    /// What the caller is told when this was the last try.
    fn into_error(self, object: &Object<'_>, probe: &Probe, range: Range<u64>, tries: &Tries<'_>) -> RemoteError {
        let url = object.url.to_owned();
        let attempts = tries.attempts;
        match self {
            Failure::TimedOut { received } => RemoteError::TimedOut { url, range, received, attempts, after: tries.elapsed() },
            Failure::Length { received } => RemoteError::WrongLength { url, range, received, attempts },
            Failure::Body { received, source } => RemoteError::Interrupted { url, range, received, attempts, source: ClientError::new(source) },
            Failure::Store(e) => classify(e, probe, object, range),
            Failure::Changed { size } => changed(url, object, size),
        }
    }
}

/// One try: the request, then its body copied into the job's targets;
/// `delivered` counts the bytes copied.
async fn fetch_once(object: &Object<'_>, job: &mut Job<'_>, probe: &Probe, progress: &Progress<'_>, delivered: &mut u64) -> Result<(), Failure> {
    let range = job.range.clone();
    let expected = range.end - range.start;
    // If-Match compares strongly, so a weak ETag (W/"…") would never match.
    let options = GetOptions {
        range: Some(GetRange::Bounded(range.clone())),
        if_match: object.version.and_then(Version::etag).filter(|etag| !etag.starts_with("W/")).map(str::to_owned),
        if_unmodified_since: match object.version {
            Some(Version::LastModified(at)) => Some(*at),
            _ => None,
        },
        extensions: probe.extensions(),
        ..GetOptions::default()
    };
    let result = object.store.get_opts(object.path, options).await.map_err(Failure::Store)?;
    // A server that ignores the condition (or a weak ETag) still names the
    // version it sent: bytes of another version are never mixed with this
    // one's. So does a new total size in Content-Range, whatever else.
    if result.meta.size != object.size || object.version.is_some_and(|expected| Version::of(&result.meta).as_ref() != Some(expected)) {
        return Err(Failure::Changed { size: result.meta.size });
    }
    if result.range != range {
        // The client checks Content-Range; a shorter range means the object shrank.
        return Err(Failure::Length { received: result.range.end.saturating_sub(result.range.start) });
    }
    let mut body = result.into_stream();
    let mut at = 0u64;
    let mut next_target = 0usize;
    while let Some(bytes) = body.next().await {
        let bytes = bytes.map_err(|source| Failure::Body { received: at, source })?;
        let n = bytes.len() as u64;
        if at + n > expected {
            return Err(Failure::Length { received: at + n });
        }
        let copied = scatter(&mut job.targets, &mut next_target, at, &bytes);
        *delivered += copied;
        progress.add(copied);
        at += n;
    }
    if at != expected {
        return Err(Failure::Length { received: at });
    }
    Ok(())
}

/// Copies `bytes`, found at `at` in the request's range, into the targets it
/// overlaps, and returns how many bytes it copied. `next` is the first target
/// not yet complete.
fn scatter(targets: &mut [(u64, &mut [u8])], next: &mut usize, at: u64, bytes: &[u8]) -> u64 {
    let end = at + bytes.len() as u64;
    let mut copied = 0;
    while let Some((offset, dst)) = targets.get_mut(*next) {
        let (t_start, t_end) = (*offset, *offset + dst.len() as u64);
        if t_start >= end {
            break;
        }
        let (a, b) = (t_start.max(at), t_end.min(end));
        if a < b {
            dst[(a - t_start) as usize..(b - t_start) as usize].copy_from_slice(&bytes[(a - at) as usize..(b - at) as usize]);
            copied += b - a;
        }
        if t_end > end {
            break;
        }
        *next += 1;
    }
    copied
}

/// Turns a client error into what the caller should be told.
pub(crate) fn classify(e: object_store::Error, probe: &Probe, object: &Object<'_>, range: Range<u64>) -> RemoteError {
    let url = object.url.to_owned();
    if probe.range_ignored() || matches!(e, object_store::Error::NotSupported { .. }) {
        let status = if probe.range_ignored() { 200 } else { probe.last_status() };
        return RemoteError::RangeIgnored { url, status };
    }
    let status = probe.last_status();
    match e {
        _ if status == 416 => RemoteError::RangeNotSatisfiable { url, range },
        object_store::Error::Precondition { .. } if object.version.is_some() => changed(url, object, object.size),
        _ if status == 412 && object.version.is_some() => changed(url, object, object.size),
        e => classify_status(url, e, Some(probe)),
    }
}

/// The errors every request can meet (reads and writes): a redirect not
/// followed, 404, 401/403, or another failure. `probe` is what the HTTP layer
/// saw of the request, where the request had one.
pub(crate) fn classify_status(url: String, e: object_store::Error, probe: Option<&Probe>) -> RemoteError {
    let status = probe.map_or(0, Probe::last_status);
    if (300..400).contains(&status)
        && let Some(location) = probe.and_then(Probe::redirected_to)
    {
        return RemoteError::Redirected { url, location };
    }
    let detail = crate::error::server_detail(&e.to_string());
    match e {
        object_store::Error::NotFound { .. } => RemoteError::NotFound { url, detail },
        _ if status == 404 => RemoteError::NotFound { url, detail },
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
            RemoteError::Forbidden { url, status: if status == 401 { 401 } else { 403 }, detail }
        }
        _ if status == 401 || status == 403 => RemoteError::Forbidden { url, status, detail },
        source => RemoteError::Transfer { url, source: ClientError::new(source) },
    }
}

/// The object is no longer the one that was opened: its size is now
/// `size`, or (same size) its version no longer matches.
fn changed(url: String, object: &Object<'_>, size: u64) -> RemoteError {
    let change = match object.version {
        _ if size != object.size => format!("it has {size} bytes now, {} when it was opened", object.size),
        Some(Version::ETag(etag)) => format!("it is no longer the version with ETag {}", tensafe::Printable(etag)),
        Some(Version::LastModified(at)) => format!("it is no longer the version last modified at {}", at.to_rfc2822()),
        None => "it is another version now".to_owned(),
    };
    RemoteError::Changed { url, change }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::RetryConfig;

    fn object<'a>(store: &'a InMemory, path: &'a Path, size: u64) -> Object<'a> {
        Object { url: "memory:///x", store, path, size, version: None, counters: &[] }
    }

    fn piece(offset: u64, dst_offset: usize, len: usize) -> Piece {
        Piece { object: 0, offset, dst_offset, len }
    }

    #[test]
    fn merges_small_gaps_and_cuts_big_pieces() {
        let store = InMemory::new();
        let path = Path::from("x");
        let objects = [object(&store, &path, 1000)];
        let mut dst = vec![0u8; 400];
        let limits = Limits { chunk: 100, gap: 10 };
        // 0..30 and 35..50 merge (gap 5); 70..80 does not (gap 20);
        // 200..450 is cut into 100-byte requests.
        let pieces = [piece(0, 0, 30), piece(35, 30, 15), piece(70, 45, 10), piece(200, 55, 250)];
        let jobs = plan(&objects, &pieces, &mut dst[..305], limits).unwrap();
        let ranges: Vec<_> = jobs.iter().map(|j| j.range.clone()).collect();
        assert_eq!(ranges, [0..50, 70..80, 200..300, 300..400, 400..450]);
        assert_eq!(jobs[0].targets.iter().map(|(o, d)| (*o, d.len())).collect::<Vec<_>>(), [(0, 30), (35, 15)]);
    }

    #[test]
    fn refuses_overlaps_and_out_of_bounds() {
        let store = InMemory::new();
        let path = Path::from("x");
        let objects = [object(&store, &path, 100)];
        let mut dst = vec![0u8; 50];
        let limits = Limits { chunk: 100, gap: 0 };
        let overlap = plan(&objects, &[piece(0, 0, 20), piece(50, 10, 20)], &mut dst, limits);
        assert!(matches!(overlap, Err(RemoteError::InvalidRequest { .. })));
        let past_dst = plan(&objects, &[piece(0, 40, 20)], &mut dst, limits);
        assert!(matches!(past_dst, Err(RemoteError::InvalidRequest { .. })));
        let past_object = plan(&objects, &[piece(90, 0, 20)], &mut dst, limits);
        assert!(matches!(past_object, Err(RemoteError::OutOfBounds { size: 100, .. })));
    }

    #[test]
    fn tries_without_a_time_limit_have_no_deadline() {
        let endless = RemoteOptions { retry: RetryConfig { retry_timeout: Duration::MAX, ..RetryConfig::default() }, ..RemoteOptions::default() };
        let mut tries = Tries::new(&endless);
        assert_eq!(crate::store::block_on(tries.attempt(async { 7 })).unwrap(), Some(7));
        assert_eq!(tries.attempts, 1);
    }

    #[test]
    fn scatter_follows_targets_across_chunks() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 4];
        let mut targets: Vec<(u64, &mut [u8])> = vec![(1, &mut a), (6, &mut b)];
        let mut next = 0;
        let data: Vec<u8> = (0..10).collect();
        for chunk in data.chunks(3).enumerate() {
            scatter(&mut targets, &mut next, (chunk.0 * 3) as u64, chunk.1);
        }
        assert_eq!(next, 2);
        assert_eq!(a, [1, 2, 3]);
        assert_eq!(b, [6, 7, 8, 9]);
    }

    #[test]
    fn reads_from_a_store_in_any_order() {
        let store = InMemory::new();
        let path = Path::from("x");
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        crate::store::block_on(object_store::ObjectStoreExt::put(&store, &path, data.clone().into())).unwrap().unwrap();
        let objects = [object(&store, &path, data.len() as u64)];
        let pieces = [piece(4000, 0, 1000), piece(0, 1000, 10), piece(17, 1010, 2000)];
        let mut dst = vec![0u8; 3010];
        let options = RemoteOptions { chunk_bytes: 300, merge_gap: 8, concurrency: 3, ..RemoteOptions::default() };
        let seen = std::sync::atomic::AtomicU64::new(0);
        let progress = |n: u64| {
            seen.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
        };
        crate::store::block_on(read_pieces(&objects, &pieces, &mut dst, &options, Some(&progress))).unwrap().unwrap();
        assert_eq!(&dst[..1000], &data[4000..5000]);
        assert_eq!(&dst[1000..1010], &data[..10]);
        assert_eq!(&dst[1010..], &data[17..2017]);
        assert_eq!(seen.into_inner(), 3010);
    }
}
