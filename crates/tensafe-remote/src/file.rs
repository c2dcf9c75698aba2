//! [`RemoteFile`]: a safetensors object whose header has been read and
//! validated, with tensors, slices and whole data sections fetched on demand.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::{GetOptions, GetRange, ObjectStore};
use tensafe::{Header, SlicePlan};

use crate::error::{ClientError, RemoteError, Result};
use crate::fetch::{classify, read_pieces, Object, Piece, Tries, Version};
use crate::store::{block_on, store_for, RemoteUrl};
use crate::traffic::{Counter, Probe, Traffic};
use crate::RemoteOptions;

/// A remote safetensors file opened for reading.
///
/// Opening reads the header alone, in one range request (two when the
/// header is longer than [`RemoteOptions::first_read`]). Reads after that
/// send `If-Match` with the object's ETag, or where the server sent none
/// `If-Unmodified-Since` with its Last-Modified time, and check the version
/// each answer names, so an object replaced in the meantime is an error
/// ([`RemoteError::Changed`]) rather than a mix of old header and new data.
#[derive(Debug)]
pub struct RemoteFile {
    url: RemoteUrl,
    store: Arc<dyn ObjectStore>,
    header: Header,
    size: u64,
    version: Option<Version>,
    options: RemoteOptions,
    /// This file's counter, then the caller's ([`RemoteOptions::counter`]).
    counters: [Counter; 2],
}

/// One byte range of a remote file to read into a destination buffer (see [`read_into`]).
#[derive(Debug, Clone, Copy)]
pub struct RemoteRange<'f> {
    /// The file.
    pub file: &'f RemoteFile,
    /// Offset in the file (not in its data section).
    pub file_offset: u64,
    /// Offset in the destination buffer.
    pub dst_offset: usize,
    /// Number of bytes.
    pub len: usize,
}

impl RemoteFile {
    /// Opens `url` with default options and reads its header.
    pub fn open(url: &str) -> Result<RemoteFile> {
        RemoteFile::open_with(url, &RemoteOptions::default())
    }

    /// Opens `url` and reads its header.
    pub fn open_with(url: &str, options: &RemoteOptions) -> Result<RemoteFile> {
        let url = RemoteUrl::parse(url)?;
        block_on(RemoteFile::open_async(url, options))?
    }

    /// Opens several files at once (e.g. the shards of a checkpoint), with up
    /// to [`RemoteOptions::concurrency`] header reads in flight.
    pub fn open_many(urls: &[&str], options: &RemoteOptions) -> Result<Vec<RemoteFile>> {
        let urls = urls.iter().map(|u| RemoteUrl::parse(u)).collect::<Result<Vec<_>>>()?;
        // The first failure (in URL order) ends it: no more files are opened.
        block_on(futures::stream::iter(urls.into_iter().map(|url| RemoteFile::open_async(url, options))).buffered(options.concurrency.max(1)).try_collect())?
    }

    async fn open_async(url: RemoteUrl, options: &RemoteOptions) -> Result<RemoteFile> {
        let store = store_for(&url, options)?;
        let counters = [Counter::new(), options.counter.clone()];
        let name = url.to_string();
        let object = |size, version| Object { url: &name, store: store.as_ref(), path: url.object_path(), size, version, counters: &counters };
        let (prefix, size, version) = RemoteFile::first_bytes(&object(0, None), &url, options).await?;
        let format = |e| RemoteError::format(&name, e);
        let n = Header::header_len(&prefix, size, &options.read_options).map_err(format)?;
        let header = if 8 + n <= prefix.len() {
            Header::parse(&prefix[8..8 + n], size).map_err(format)?
        } else {
            // Second request: the rest of the header.
            let mut json = vec![0u8; n];
            let have = prefix.len() - 8;
            json[..have].copy_from_slice(&prefix[8..]);
            let piece = Piece { object: 0, offset: prefix.len() as u64, dst_offset: 0, len: n - have };
            read_pieces(&[object(size, version.as_ref())], &[piece], &mut json[have..], options, None).await?;
            Header::parse(&json, size).map_err(format)?
        };
        Ok(RemoteFile { url, store, header, size, version, options: options.clone(), counters })
    }

    /// First request: the start of the file, which tells its size (from
    /// Content-Range) and version too. A body of the wrong length is retried.
    async fn first_bytes(object: &Object<'_>, url: &RemoteUrl, options: &RemoteOptions) -> Result<(Bytes, u64, Option<Version>)> {
        let first_len = options.first_read.max(8) as u64;
        let mut tries = Tries::new(options);
        loop {
            let probe = Probe::new(object.counters.to_vec(), options.max_retry_after);
            let get = GetOptions { range: Some(GetRange::Bounded(0..first_len)), extensions: probe.extensions(), ..GetOptions::default() };
            // The body as it arrives, so that a failure can say how much came.
            let mut body = Vec::new();
            let once = async {
                let first = object.store.get_opts(object.path, get).await?;
                let (size, version) = (first.meta.size, Version::of(&first.meta));
                let mut stream = first.into_stream();
                let mut failure = None;
                while let Some(bytes) = stream.next().await {
                    match bytes {
                        // More than asked for: a wrong length, whatever follows.
                        Ok(bytes) if (body.len() + bytes.len()) as u64 > first_len => {
                            body.extend_from_slice(&bytes[..first_len as usize + 1 - body.len()]);
                            break;
                        }
                        Ok(bytes) => body.extend_from_slice(&bytes),
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                }
                Ok::<_, object_store::Error>((failure, size, version))
            };
            let (failure, size, version) = match tries.attempt(once).await {
                Some(Ok(answer)) => answer,
                Some(Err(e)) => return Err(RemoteFile::first_error(classify(e, &probe, object, 0..first_len), &probe, url, object.store, options).await),
                None => {
                    let (range, attempts, after) = (0..first_len, tries.attempts, tries.elapsed());
                    return Err(RemoteError::TimedOut { url: url.to_string(), range, received: body.len() as u64, attempts, after });
                }
            };
            let expected = first_len.min(size);
            let received = body.len() as u64;
            if failure.is_none() && received == expected {
                return Ok((Bytes::from(body), size, version));
            }
            if !tries.wait().await {
                let (url, range, attempts) = (url.to_string(), 0..expected, tries.attempts);
                return Err(match failure {
                    Some(source) => RemoteError::Interrupted { url, range, received, attempts, source: ClientError::new(source) },
                    None => RemoteError::WrongLength { url, range, received, attempts },
                });
            }
        }
    }

    /// The error of a failed first request, with the format's words for empty objects.
    async fn first_error(error: RemoteError, probe: &Probe, url: &RemoteUrl, store: &dyn ObjectStore, options: &RemoteOptions) -> RemoteError {
        match error {
            // An empty object has no byte 0 (416), or some servers answer it
            // with an empty 200: say what the format says.
            RemoteError::RangeNotSatisfiable { .. } => RemoteFile::empty_or(error, url, store, options).await,
            RemoteError::RangeIgnored { .. } if probe.whole_object_len().is_some_and(|n| n < 8) => {
                let n = probe.whole_object_len().unwrap_or_default();
                Header::header_len(&[], n, &options.read_options).map_or_else(|e| RemoteError::format(url.as_str(), e), |_| error)
            }
            other => other,
        }
    }

    /// The error for a 416 on the first bytes: a HEAD tells whether the object is empty.
    async fn empty_or(error: RemoteError, url: &RemoteUrl, store: &dyn ObjectStore, options: &RemoteOptions) -> RemoteError {
        let probe = Probe::new(vec![options.counter.clone()], options.max_retry_after);
        let head = GetOptions { head: true, extensions: probe.extensions(), ..GetOptions::default() };
        match store.get_opts(url.object_path(), head).await {
            Ok(result) if result.meta.size < 8 => match Header::header_len(&[], result.meta.size, &options.read_options) {
                Err(e) => RemoteError::format(url.as_str(), e),
                Ok(_) => error,
            },
            _ => error,
        }
    }

    /// The URL.
    pub fn url(&self) -> &RemoteUrl {
        &self.url
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Size of the object in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The object's ETag when opened, if the server sent one.
    pub fn etag(&self) -> Option<&str> {
        self.version.as_ref().and_then(Version::etag)
    }

    /// The options the file was opened with.
    pub fn options(&self) -> &RemoteOptions {
        &self.options
    }

    /// Requests made and bytes received for this file so far, opening included.
    pub fn traffic(&self) -> Traffic {
        self.counters[0].traffic()
    }

    fn object(&self) -> Object<'_> {
        Object {
            url: self.url.as_str(),
            store: self.store.as_ref(),
            path: self.url.object_path(),
            size: self.size,
            version: self.version.as_ref(),
            counters: &self.counters,
        }
    }

    /// A range of this file for [`read_into`]: `len` bytes at `file_offset` to `dst_offset`.
    pub fn range(&self, file_offset: u64, dst_offset: usize, len: usize) -> RemoteRange<'_> {
        RemoteRange { file: self, file_offset, dst_offset, len }
    }

    /// Reads one tensor's bytes into a new buffer.
    pub fn read_tensor(&self, name: &str) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; self.tensor_range(name, 0)?.len];
        self.read_tensor_into(name, &mut buf)?;
        Ok(buf)
    }

    /// Reads one tensor's bytes into `dst`, which must have exactly its size.
    pub fn read_tensor_into(&self, name: &str, dst: &mut [u8]) -> Result<Traffic> {
        let range = self.tensor_range(name, 0)?;
        if dst.len() != range.len {
            let e = tensafe::Error::BufferSize { expected: range.len as u64, actual: dst.len() as u64 };
            return Err(RemoteError::format(self.url.as_str(), e));
        }
        read_into(&[range], dst, &self.options, None)
    }

    /// The range of one whole tensor, to go to `dst_offset` (for [`read_into`]).
    pub fn tensor_range(&self, name: &str, dst_offset: usize) -> Result<RemoteRange<'_>> {
        let info = self.header.info(name).map_err(|e| RemoteError::format(self.url.as_str(), e))?;
        Ok(self.range(self.header.data_start() + info.data_offsets.0 as u64, dst_offset, info.byte_len()))
    }

    /// Appends the ranges of a slice of tensor `name` to `out`, its bytes to
    /// go to `dst_offset..dst_offset + plan.byte_len()` in output order. Lets
    /// a caller read the slices of many tensors (e.g. one rank's share of a
    /// whole checkpoint) in one concurrent [`read_into`].
    pub fn slice_ranges<'f>(&'f self, name: &str, plan: &SlicePlan, dst_offset: usize, out: &mut Vec<RemoteRange<'f>>) -> Result<()> {
        let base = self.slice_base(name, plan)?;
        let mut at = dst_offset;
        out.extend(plan.ranges().map(|r| {
            let range = self.range(base + r.start as u64, at, r.len());
            at += r.len();
            range
        }));
        Ok(())
    }

    /// Where tensor `name`'s bytes begin in the file, once `plan` is known to
    /// stay within them.
    fn slice_base(&self, name: &str, plan: &SlicePlan) -> Result<u64> {
        let format = |e| RemoteError::format(self.url.as_str(), e);
        let info = self.header.info(name).map_err(format)?;
        let end = plan.span().end;
        if end > info.byte_len() {
            return Err(format(tensafe::Error::InvalidSlice {
                reason: format!("the plan reaches byte {end} of tensor `{}`, which has {} bytes", tensafe::Printable(name), info.byte_len()),
            }));
        }
        Ok(self.header.data_start() + info.data_offsets.0 as u64)
    }

    /// Reads only the bytes a slice selects into `dst` (`plan.byte_len()`
    /// bytes): the plan's runs become range requests, merged across gaps of
    /// at most [`RemoteOptions::merge_gap`].
    pub fn read_slice_into(&self, name: &str, plan: &SlicePlan, dst: &mut [u8]) -> Result<Traffic> {
        if dst.len() != plan.byte_len() {
            let e = tensafe::Error::BufferSize { expected: plan.byte_len() as u64, actual: dst.len() as u64 };
            return Err(RemoteError::format(self.url.as_str(), e));
        }
        if plan.reads_as_span() && plan.largest_gap() <= self.options.merge_gap {
            // One range for runs of a few bytes (no list of millions of them).
            let span = plan.span();
            let mut bytes = vec![0u8; span.len()];
            let start = self.slice_base(name, plan)? + span.start as u64;
            let traffic = read_into(&[self.range(start, 0, span.len())], &mut bytes, &self.options, None)?;
            plan.copy_from_span(&bytes, dst).map_err(|e| RemoteError::format(self.url.as_str(), e))?;
            return Ok(traffic);
        }
        // The runs a quarter million at a time: a list of them takes about
        // 140 bytes a run with its pieces.
        const RUNS_AT_A_TIME: usize = 1 << 18;
        let base = self.slice_base(name, plan)?;
        let mut traffic = Traffic::default();
        for (part, runs) in plan.batches(RUNS_AT_A_TIME) {
            let ranges: Vec<_> = runs.into_iter().map(|(at, to, len)| self.range(base + at as u64, to, len)).collect();
            traffic = traffic + read_into(&ranges, &mut dst[part], &self.options, None)?;
        }
        Ok(traffic)
    }

    /// Reads the whole data section (every tensor, in file order) into `dst`
    /// (`header().data_len()` bytes) with [`RemoteOptions::concurrency`]
    /// requests in flight. `progress` gets the running total of bytes delivered.
    pub fn read_data_into(&self, dst: &mut [u8], progress: Option<&(dyn Fn(u64) + Sync)>) -> Result<Traffic> {
        self.read_data(dst, progress, None)
    }

    /// [`RemoteFile::read_data_into`] that can be stopped, as
    /// [`read_into_until`] describes.
    pub fn read_data_into_until(&self, dst: &mut [u8], progress: Option<&(dyn Fn(u64) + Sync)>, stop: &mut dyn FnMut() -> bool) -> Result<Traffic> {
        self.read_data(dst, progress, Some(stop))
    }

    fn read_data(&self, dst: &mut [u8], progress: Option<&(dyn Fn(u64) + Sync)>, stop: Option<&mut dyn FnMut() -> bool>) -> Result<Traffic> {
        if dst.len() != self.header.data_len() {
            return Err(RemoteError::format(
                self.url.as_str(),
                tensafe::Error::BufferSize { expected: self.header.data_len() as u64, actual: dst.len() as u64 },
            ));
        }
        transfer(&[self.range(self.header.data_start(), 0, dst.len())], dst, &self.options, progress, stop)
    }

    /// Streams the data section through `visit` in order, `window` bytes at a
    /// time (each window fetched with concurrent requests), using one buffer
    /// of `window` bytes. `visit` gets each window's offset in the data
    /// section; `progress` the running total over the whole section.
    pub fn stream_data<E: From<RemoteError>>(
        &self,
        window: usize,
        progress: Option<&(dyn Fn(u64) + Sync)>,
        mut visit: impl FnMut(u64, &[u8]) -> std::result::Result<(), E>,
    ) -> std::result::Result<Traffic, E> {
        let total = self.header.data_len() as u64;
        let window = window.max(1) as u64;
        let mut buf = vec![0u8; window.min(total) as usize];
        let mut traffic = Traffic::default();
        let mut at = 0u64;
        while at < total {
            let len = window.min(total - at) as usize;
            let base = at;
            let shifted = move |n: u64| {
                if let Some(p) = progress {
                    p(base + n);
                }
            };
            let range = self.range(self.header.data_start() + at, 0, len);
            let step = read_into(&[range], &mut buf[..len], &self.options, Some(&shifted))?;
            traffic = traffic + step;
            visit(at, &buf[..len])?;
            at += len as u64;
        }
        Ok(traffic)
    }
}

/// Reads byte ranges of one or several remote files into `dst` with
/// coalesced, concurrent range requests (like `tensafe_io::read_into` for
/// local files). `options` sets the concurrency and request sizes; the files
/// keep their own clients and counters.
///
/// Ranges must lie inside their file and inside `dst`, and must not overlap
/// in `dst` (checked). Returns the traffic of this call.
pub fn read_into(ranges: &[RemoteRange<'_>], dst: &mut [u8], options: &RemoteOptions, progress: Option<&(dyn Fn(u64) + Sync)>) -> Result<Traffic> {
    transfer(ranges, dst, options, progress, None)
}

/// How often a transfer asks whether to stop.
const STOP_CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// [`read_into`] that asks `stop`, on the calling thread, every 50 ms: when
/// it answers `true` (Ctrl-C), the requests in flight are cancelled and the
/// call ends with [`RemoteError::Stopped`], `dst` partly written.
pub fn read_into_until(
    ranges: &[RemoteRange<'_>],
    dst: &mut [u8],
    options: &RemoteOptions,
    progress: Option<&(dyn Fn(u64) + Sync)>,
    stop: &mut dyn FnMut() -> bool,
) -> Result<Traffic> {
    transfer(ranges, dst, options, progress, Some(stop))
}

/// [`read_into`], asking `stop` every tick when there is one.
fn transfer(
    ranges: &[RemoteRange<'_>],
    dst: &mut [u8],
    options: &RemoteOptions,
    progress: Option<&(dyn Fn(u64) + Sync)>,
    stop: Option<&mut dyn FnMut() -> bool>,
) -> Result<Traffic> {
    // One object entry per distinct file, in first-seen order.
    let mut files: Vec<&RemoteFile> = Vec::new();
    let pieces: Vec<Piece> = ranges
        .iter()
        .map(|r| {
            let object = match files.iter().position(|f| std::ptr::eq(*f, r.file)) {
                Some(i) => i,
                None => {
                    files.push(r.file);
                    files.len() - 1
                }
            };
            Piece { object, offset: r.file_offset, dst_offset: r.dst_offset, len: r.len }
        })
        .collect();
    let objects: Vec<Object<'_>> = files.iter().map(|f| f.object()).collect();
    let transfer = read_pieces(&objects, &pieces, dst, options, progress);
    let Some(stop) = stop else { return block_on(transfer)? };
    block_on(async {
        let transfer = std::pin::pin!(transfer);
        let watch = std::pin::pin!(async {
            loop {
                tokio::time::sleep(STOP_CHECK_INTERVAL).await;
                if stop() {
                    return;
                }
            }
        });
        match futures::future::select(transfer, watch).await {
            futures::future::Either::Left((done, _)) => done,
            futures::future::Either::Right(((), _)) => Err(RemoteError::Stopped),
        }
    })?
}
