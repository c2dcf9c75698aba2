//! HTTP range reads against real servers on 127.0.0.1: nginx (range
//! support), Python's http.server (no range support), and a fault-injecting
//! proxy in front of nginx.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::proxy::{Fault, FaultProxy};
use common::{Nginx, PythonHttp, Tensor};
use tensafe::{PreadFile, SliceIndex, SlicePlan};
use tensafe_remote::{read_into, BackoffConfig, RemoteError, RemoteFile, RemoteOptions, RetryConfig};

/// A served directory with the fixtures every test uses.
fn fixtures() -> (tempfile::TempDir, Vec<Tensor>) {
    let dir = tempfile::Builder::new().prefix("tensafe-http-root").tempdir().unwrap();
    let tensors = common::mixed_tensors();
    common::write_file(&dir.path().join("mixed.safetensors"), &tensors);
    common::write_big_header_file(&dir.path().join("big-header.safetensors"));
    common::write_sparse_file(&dir.path().join("sparse-50GB.safetensors"), 50_000_000_000);
    std::fs::write(dir.path().join("empty.safetensors"), b"").unwrap();
    std::fs::write(dir.path().join("page.safetensors"), b"<!DOCTYPE html><html><body>Sign in to continue</body></html>").unwrap();
    (dir, tensors)
}

/// Checks every tensor and some slices of `file` against the local copy.
fn assert_same_as_local(file: &RemoteFile, local: &Path) {
    let local = PreadFile::open(local).unwrap();
    assert_eq!(file.header().names_in_file_order(), local.header().names_in_file_order());
    assert_eq!(file.size(), local.header().data_start() + local.header().data_len() as u64);
    for (name, info) in local.header().iter() {
        assert_eq!(file.header().info(name).unwrap(), info);
        assert_eq!(file.read_tensor(name).unwrap(), local.read_tensor(name).unwrap(), "{name}");
    }
}

fn slice_both(file: &RemoteFile, local: &PreadFile, name: &str, indices: &[SliceIndex]) -> (Vec<u8>, Vec<u8>) {
    let info = local.header().info(name).unwrap();
    let plan = SlicePlan::new(info.dtype, &info.shape, indices).unwrap();
    let mut remote = vec![0u8; plan.byte_len()];
    file.read_slice_into(name, &plan, &mut remote).unwrap();
    let mut expected = vec![0u8; plan.byte_len()];
    plan.copy_into(&local.read_tensor(name).unwrap(), &mut expected).unwrap();
    (remote, expected)
}

#[test]
fn nginx_serves_headers_tensors_slices_and_whole_files() {
    let (root, _) = fixtures();
    let Some(nginx) = Nginx::start(root.path()) else { return };
    let local_path = root.path().join("mixed.safetensors");

    // Header-only inspection: one request, at most the first read.
    let file = RemoteFile::open(&nginx.url("mixed.safetensors")).unwrap();
    let opened = file.traffic();
    assert_eq!(opened.requests, 1, "{opened:?}");
    assert!(opened.bytes <= 64 << 10, "{opened:?}");
    assert!(file.etag().is_some());
    assert_same_as_local(&file, &local_path);

    // A header longer than the first read: exactly two requests.
    let big = RemoteFile::open(&nginx.url("big-header.safetensors")).unwrap();
    assert_eq!(big.traffic().requests, 2, "{:?}", big.traffic());
    assert!(big.header().header_len_bytes() > 64 << 10);
    assert_eq!(big.header().len(), 1500);
    assert_same_as_local(&big, &root.path().join("big-header.safetensors"));

    // 50 GB (sparse) on the server: inspection fetches one request of 64 KiB.
    let sparse = RemoteFile::open(&nginx.url("sparse-50GB.safetensors")).unwrap();
    assert_eq!(sparse.header().data_len(), 50_000_000_000);
    let t = sparse.traffic();
    assert!(t.requests == 1 && t.bytes < 1_000_000, "{t:?}");

    // Slices: only the selected bytes (dim 0: one request), merged runs (dim 1).
    let local = PreadFile::open(&local_path).unwrap();
    let before = file.traffic();
    let (remote, expected) = slice_both(&file, &local, "embed.weight", &[SliceIndex::range(128, 256)]);
    assert_eq!(remote, expected);
    let spent = file.traffic() - before;
    assert_eq!((spent.requests, spent.bytes), (1, 128 * 384 * 4));
    let step = SliceIndex::Range { start: Some(1), stop: None, step: Some(3) };
    for indices in [
        vec![SliceIndex::FULL, SliceIndex::range(10, 20)],
        vec![step, SliceIndex::Index(-1)],
        vec![SliceIndex::Ellipsis, SliceIndex::range(90, 200)],
        vec![SliceIndex::NewAxis, SliceIndex::range(0, 0)],
    ] {
        let (remote, expected) = slice_both(&file, &local, "embed.weight", &indices);
        assert_eq!(remote, expected, "{indices:?}");
    }
    // Columns with merging off: one request per row; on: one request.
    let columns = SlicePlan::new(tensafe::Dtype::F32, &[512, 384], &[SliceIndex::FULL, SliceIndex::range(0, 8)]).unwrap();
    let mut dst = vec![0u8; columns.byte_len()];
    let no_merge = RemoteOptions { merge_gap: 0, chunk_bytes: 1 << 20, ..RemoteOptions::default() };
    let unmerged = RemoteFile::open_with(&nginx.url("mixed.safetensors"), &no_merge).unwrap();
    assert_eq!(unmerged.read_slice_into("embed.weight", &columns, &mut dst).unwrap().requests, 512);
    assert_eq!(file.read_slice_into("embed.weight", &columns, &mut dst).unwrap().requests, 1);

    // The whole data section, in small concurrent requests, with progress.
    let small = RemoteOptions { concurrency: 4, chunk_bytes: 16 << 10, ..RemoteOptions::default() };
    let chunked = RemoteFile::open_with(&nginx.url("mixed.safetensors"), &small).unwrap();
    let mut data = vec![0u8; chunked.header().data_len()];
    let last = std::sync::atomic::AtomicU64::new(0);
    let spent = chunked
        .read_data_into(&mut data, Some(&|n| {
            last.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
        }))
        .unwrap();
    let bytes = std::fs::read(&local_path).unwrap();
    assert_eq!(&data[..], &bytes[local.header().data_start() as usize..]);
    assert_eq!(spent.requests, (data.len() as u64).div_ceil(16 << 10));
    assert_eq!(last.into_inner(), data.len() as u64);

    // Two files into one buffer, in one call.
    let a = file.header().info("positions").unwrap().clone();
    let b = big.header().info("model.layers.00007.a_rather_long_parameter_name_to_grow_the_header").unwrap().clone();
    let mut both = vec![0u8; a.byte_len() + b.byte_len()];
    read_into(
        &[
            file.range(file.header().data_start() + a.data_offsets.0 as u64, 0, a.byte_len()),
            big.range(big.header().data_start() + b.data_offsets.0 as u64, a.byte_len(), b.byte_len()),
        ],
        &mut both,
        &RemoteOptions::default(),
        None,
    )
    .unwrap();
    assert_eq!(&both[..a.byte_len()], &file.read_tensor("positions").unwrap()[..]);
    assert_eq!(&both[a.byte_len()..], &big.read_tensor("model.layers.00007.a_rather_long_parameter_name_to_grow_the_header").unwrap()[..]);
}

#[test]
fn nginx_errors_are_clear() {
    let (root, _) = fixtures();
    let Some(nginx) = Nginx::start(root.path()) else { return };

    let missing = RemoteFile::open(&nginx.url("nope.safetensors")).unwrap_err();
    assert!(missing.is_not_found(), "{missing}");
    assert!(missing.to_string().contains("nope.safetensors") && missing.to_string().contains("404"), "{missing}");

    // An empty object has no byte 0 (416): a HEAD says it is empty.
    let empty = RemoteFile::open(&nginx.url("empty.safetensors")).unwrap_err().to_string();
    assert!(empty.contains("header too small") && empty.contains("empty"), "{empty}");

    let page = RemoteFile::open(&nginx.url("page.safetensors")).unwrap_err().to_string();
    assert!(page.contains("header too large") && page.contains("HTML"), "{page}");

    // Several files: the first failure ends the opening (one at a time here).
    let proxy = FaultProxy::start(nginx.port);
    let urls = [proxy.url("nope.safetensors"), proxy.url("mixed.safetensors"), proxy.url("mixed.safetensors")];
    let one_at_a_time = RemoteOptions { concurrency: 1, ..RemoteOptions::default() };
    let err = RemoteFile::open_many(&urls.iter().map(String::as_str).collect::<Vec<_>>(), &one_at_a_time).map(|files| files.len()).unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert_eq!(proxy.seen().len(), 1, "files were opened after the failure: {:?}", proxy.seen());

    // Reads outside the object are refused before any request.
    let file = RemoteFile::open(&nginx.url("mixed.safetensors")).unwrap();
    let before = file.traffic();
    let mut dst = vec![0u8; 16];
    let err = read_into(&[file.range(file.size() - 8, 0, 16)], &mut dst, file.options(), None).unwrap_err();
    assert!(matches!(err, RemoteError::OutOfBounds { .. }), "{err}");
    let overlap = read_into(&[file.range(0, 0, 8), file.range(8, 4, 8)], &mut dst, file.options(), None).unwrap_err();
    assert!(matches!(overlap, RemoteError::InvalidRequest { .. }), "{overlap}");
    assert_eq!(file.traffic(), before);

    // The object is replaced after opening: If-Match fails, no mixed data.
    let path = root.path().join("mixed.safetensors");
    std::thread::sleep(Duration::from_millis(1100)); // a new mtime, so a new ETag
    let mut tensors = common::mixed_tensors();
    tensors[0].data.iter_mut().for_each(|b| *b = b.wrapping_add(1));
    common::write_file(&path, &tensors);
    let changed = file.read_tensor("embed.weight").unwrap_err();
    assert!(matches!(changed, RemoteError::Changed { .. }), "{changed}");
    assert!(changed.to_string().contains("changed"), "{changed}");
}

#[test]
fn a_server_that_ignores_range_is_refused() {
    let (root, _) = fixtures();
    let big = root.path().join("big.safetensors");
    common::write_file(&big, &[Tensor::new("w", tensafe::Dtype::U8, &[64 << 20], 9)]);
    let Some(server) = PythonHttp::start(root.path()) else { return };
    let (head, body) = common::raw_get(server.port, "/mixed.safetensors", Some("0-15"));
    assert!(head.starts_with("HTTP/1.0 200"), "the server should ignore Range: {head}");
    assert!(body.len() > 16);

    let start = Instant::now();
    let err = RemoteFile::open(&server.url("big.safetensors")).unwrap_err();
    assert!(matches!(err, RemoteError::RangeIgnored { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("ignores HTTP Range") && text.contains("big.safetensors"), "{text}");
    // The 64 MiB body was not downloaded.
    assert!(start.elapsed() < Duration::from_secs(10));
    let _ = server.server.pid();
}

fn fast_retries(max_retries: usize) -> RemoteOptions {
    RemoteOptions {
        retry: RetryConfig {
            backoff: BackoffConfig { init_backoff: Duration::from_millis(10), max_backoff: Duration::from_millis(50), base: 2.0 },
            max_retries,
            retry_timeout: Duration::from_secs(60),
        },
        timeout: Duration::from_secs(2),
        chunk_bytes: 4 << 20,
        ..RemoteOptions::default()
    }
}

#[test]
fn faults_are_retried_or_reported_never_returned() {
    let (root, _) = fixtures();
    let Some(nginx) = Nginx::start(root.path()) else { return };
    let proxy = FaultProxy::start(nginx.port);
    let url = proxy.url("mixed.safetensors");
    let local = PreadFile::open(root.path().join("mixed.safetensors")).unwrap();
    let expected = local.read_tensor("embed.weight").unwrap();
    let file = RemoteFile::open_with(&url, &fast_retries(3)).unwrap();
    fn read(file: &RemoteFile) -> Result<Vec<u8>, Box<RemoteError>> {
        file.read_tensor("embed.weight").map_err(Box::new)
    }

    // Recoverable faults: each once, then a clean answer.
    for (fault, tries) in [
        (Fault::Delay(Duration::from_millis(300)), 1),
        (Fault::Delay(Duration::from_secs(3)), 2),     // past the 2 s timeout: retried
        (Fault::Unavailable { retry_after: 0 }, 2),
        (Fault::Truncate { keep: 1000 }, 2),            // resumed from byte 1000
        (Fault::HalfLength, 2),                         // short body: retried by tensafe
        (Fault::Reset, 2),
        (Fault::Status(500), 2),
        (Fault::Chunked, 1), // no Content-Length: the range gives the length
    ] {
        proxy.reset();
        proxy.schedule([fault.clone()]);
        let data = read(&file).unwrap_or_else(|e| panic!("{fault:?}: {e}"));
        assert_eq!(data, expected, "{fault:?}");
        assert_eq!(proxy.seen().len(), tries, "{fault:?}: {:?}", proxy.seen());
    }

    // Concurrency is bounded: 24 requests of 32 KiB, each held 1 s by the
    // proxy, 8 at a time: 3 waves, never more than 8 at once.
    proxy.reset();
    proxy.set_steady(Some(Fault::Delay(Duration::from_secs(1))));
    // A 5 s timeout: 1 s of delay leaves a 2 s one too little on a loaded
    // machine, and a retry would count as a 25th request.
    let eight = RemoteOptions { concurrency: 8, chunk_bytes: 32 << 10, timeout: Duration::from_secs(5), ..fast_retries(3) };
    let limited = RemoteFile::open_with(&url, &eight).unwrap();
    let mut dst = vec![0u8; 24 * (32 << 10)];
    let start = Instant::now();
    let spent = read_into(&[limited.range(limited.header().data_start(), 0, dst.len())], &mut dst, &eight, None).unwrap();
    let took = start.elapsed();
    assert_eq!(spent.requests, 24);
    // Requests arriving within the first delay: exactly the first wave (no
    // second-wave request can come before a first-wave answer, 1 s after
    // it; the 0.9 s window leaves the first wave time to arrive on a loaded
    // machine).
    let seen = &proxy.seen()[1..]; // after the opening request
    let first_wave = seen.iter().filter(|s| s.at.duration_since(seen[0].at) < Duration::from_millis(900)).count();
    assert_eq!(first_wave, 8, "took {took:?}");
    assert!(took >= Duration::from_secs(3) && took < Duration::from_secs(15), "{took:?} (one at a time would take 24 s)");
    assert_eq!(&dst[..], &std::fs::read(root.path().join("mixed.safetensors")).unwrap()[local.header().data_start() as usize..][..dst.len()]);

    // A server that sends another version whatever If-Match says: refused
    // at once (not retried), never mixed into this one.
    proxy.reset();
    proxy.schedule([Fault::OtherETag]);
    let changed = read(&file).unwrap_err();
    assert!(matches!(*changed, RemoteError::Changed { .. }), "{changed}");
    assert_eq!(proxy.seen().len(), 1);

    // So is an answer that gives the object another size, and a
    // Content-Range no client can use (its last byte is 2^64 - 1).
    for (fault, says) in [
        (Fault::OtherTotal, "the object changed while it was being read (it has"),
        (Fault::HugeContentRange, "-18446744073709551615/861185\" (tensafe needs `bytes FIRST-LAST/SIZE`"),
    ] {
        proxy.reset();
        proxy.set_steady(Some(fault.clone()));
        let text = read(&file).unwrap_err().to_string();
        assert!(text.contains(says), "{fault:?}: {text}");
        assert_eq!(proxy.seen().len(), 1, "{fault:?} was retried");
    }

    // No ETag: the Last-Modified time tells versions apart, sent as
    // If-Unmodified-Since and checked on every answer.
    proxy.reset();
    proxy.set_steady(Some(Fault::NoETag));
    let dated = RemoteFile::open_with(&url, &fast_retries(3)).unwrap();
    assert_eq!(dated.etag(), None);
    assert_eq!(read(&dated).unwrap(), expected);
    assert!(proxy.seen().iter().skip(1).all(|seen| seen.head.to_ascii_lowercase().contains("if-unmodified-since")), "{:?}", proxy.seen());
    proxy.set_steady(Some(Fault::NoETagOtherDate));
    let replaced = read(&dated).unwrap_err();
    assert!(matches!(*replaced, RemoteError::Changed { .. }) && replaced.to_string().contains("last modified at"), "{replaced}");

    // An answer with another success status than 206 is named as it is.
    proxy.reset();
    proxy.set_steady(Some(Fault::NoContent));
    let text = read(&file).unwrap_err().to_string();
    assert!(text.contains("it answered 204 instead of 206"), "{text}");

    // Weak ETags: compared as given, never sent in If-Match (which compares
    // strongly, so every read would fail).
    proxy.reset();
    proxy.set_steady(Some(Fault::WeakETag));
    let weak = RemoteFile::open_with(&url, &fast_retries(3)).unwrap();
    assert!(weak.etag().is_some_and(|etag| etag.starts_with("W/")), "{:?}", weak.etag());
    assert_eq!(read(&weak).unwrap(), expected);
    assert!(proxy.seen().iter().all(|seen| !seen.head.to_ascii_lowercase().contains("if-match")), "{:?}", proxy.seen());
    proxy.set_steady(Some(Fault::OtherETag));
    assert!(matches!(*read(&weak).unwrap_err(), RemoteError::Changed { .. }));

    // Retry-After is waited for.
    proxy.reset();
    proxy.schedule([Fault::Unavailable { retry_after: 1 }, Fault::Unavailable { retry_after: 1 }]);
    let start = Instant::now();
    assert_eq!(read(&file).unwrap(), expected);
    assert!(start.elapsed() >= Duration::from_secs(2), "{:?}", start.elapsed());

    // Persistent faults: a clear error after the retries, never data.
    let persistent: [(Fault, &str, usize); 6] = [
        (Fault::HalfLength, "but the server sent", 4),
        (Fault::DoubleLength, "broke off", 4),
        (Fault::WrongContentRange, "Requested", 1), // a server bug: not retried
        (Fault::Reset, "error", 4),
        (Fault::Unavailable { retry_after: 0 }, "503", 4),
        (Fault::Truncate { keep: 10 }, "broke off", 4),
    ];
    for (fault, says, tries) in persistent {
        proxy.reset();
        proxy.set_steady(Some(fault.clone()));
        let err = read(&file).expect_err(&format!("{fault:?} must fail"));
        let text = err.to_string();
        eprintln!("{fault:?} -> {text}");
        assert!(text.contains(says) && text.contains("mixed.safetensors"), "{fault:?}: {text}");
        assert!(proxy.seen().len() >= tries, "{fault:?} was not retried: {:?}", proxy.seen());
    }

    // A stalled server costs at most the retry budget's time plus one
    // request's timeout, whatever the client's own retries inside each try.
    proxy.reset();
    proxy.set_steady(Some(Fault::Stall { keep: 1000 }));
    let impatient = RemoteOptions { retry: RetryConfig { retry_timeout: Duration::from_secs(2), max_retries: 10, ..fast_retries(0).retry }, ..fast_retries(0) };
    // retry_timeout + timeout, and slack for a loaded machine (without the
    // shared budget, each of the 11 tries ran its own: 22 s or more).
    let limit = Duration::from_secs(2 + 2 + 6);
    let start = Instant::now();
    let on_open = RemoteFile::open_with(&url, &impatient).unwrap_err();
    let took = start.elapsed();
    assert!(matches!(on_open, RemoteError::TimedOut { received: 1000, .. } | RemoteError::Interrupted { received: 1000, .. }), "{on_open}");
    assert!(took < limit, "a stalled server held an open for {took:?}");
    proxy.set_steady(None);
    let slow = RemoteFile::open_with(&url, &impatient).unwrap();
    proxy.set_steady(Some(Fault::Stall { keep: 1000 }));
    let start = Instant::now();
    let on_read = slow.read_tensor("embed.weight").map(|data| data.len()).unwrap_err();
    let took = start.elapsed();
    assert!(matches!(on_read, RemoteError::TimedOut { received: 1000, .. } | RemoteError::Interrupted { received: 1000, .. }), "{on_read}");
    assert!(took < limit, "a stalled server held a read for {took:?}");

    // Client errors are not retried.
    for (status, expect) in [(403u16, "access denied (HTTP 403)"), (401, "access denied (HTTP 401)"), (404, "not found (HTTP 404)"), (416, "416 Range Not Satisfiable")] {
        proxy.reset();
        proxy.set_steady(Some(Fault::Status(status)));
        let text = read(&file).unwrap_err().to_string();
        assert!(text.contains(expect), "{status}: {text}");
        assert_eq!(proxy.seen().len(), 1, "{status} was retried");
    }

    // A huge error body is read only in part, and what a server says is
    // shown escaped: no terminal control sequences or forged lines.
    proxy.reset();
    proxy.set_steady(Some(Fault::HostileStatus { status: 403, len: 64 << 20 }));
    let before = file.traffic();
    let text = read(&file).unwrap_err().to_string();
    let received = (file.traffic() - before).bytes;
    assert!(received < 1 << 20, "{received} bytes of the error body were read");
    assert!(text.contains("access denied (HTTP 403)") && text.contains("forged log line"), "{}", &text[..200]);
    assert!(text.len() < 200 << 10 && !text.contains('\x1b') && !text.contains('\n'), "{} bytes: {:?}", text.len(), &text[..200]);

    // Another refusal: the client's error, which quotes the body, and every
    // error under it, which reporters walking `source()` print too, are escaped.
    proxy.reset();
    proxy.set_steady(Some(Fault::HostileStatus { status: 400, len: 4096 }));
    let error = read(&file).unwrap_err();
    assert!(matches!(*error, RemoteError::Transfer { .. }), "{error}");
    let mut texts = Vec::new();
    let mut level: Option<&dyn std::error::Error> = Some(&*error);
    while let Some(e) = level {
        texts.push(e.to_string());
        level = e.source();
    }
    assert!(texts.len() >= 3 && texts[2..].iter().any(|t| t.contains("forged log line")), "{texts:#?}");
    assert!(texts.iter().all(|t| !t.contains('\x1b') && !t.contains('\n')), "{texts:#?}");

    // A chunked answer longer than its range is cut off where it overruns,
    // on open (whose first read collects the body) as on reads.
    proxy.reset();
    proxy.set_steady(Some(Fault::ChunkedTooLong { extra: 32 << 20 }));
    let counted = RemoteOptions { counter: tensafe_remote::Counter::new(), ..fast_retries(0) };
    let text = RemoteFile::open_with(&url, &counted).unwrap_err().to_string();
    assert!(text.contains("but the server sent"), "{text}");
    let received = counted.counter.traffic().bytes;
    assert!(received < 4 << 20, "{received} bytes were taken from an endless answer");

    // Opening through the proxy: a short first answer is retried…
    proxy.reset();
    proxy.schedule([Fault::HalfLength]);
    let reopened = RemoteFile::open_with(&url, &fast_retries(1)).unwrap();
    assert_eq!(reopened.traffic().requests, 2);
    // …and reported when it stays short.
    proxy.reset();
    proxy.set_steady(Some(Fault::HalfLength));
    let text = RemoteFile::open_with(&url, &fast_retries(1)).unwrap_err().to_string();
    assert!(text.contains("but the server sent"), "{text}");
}

#[test]
fn redirects_leave_a_cloud_store_never_and_a_web_server_freely() {
    let (root, _) = fixtures();
    // nginx also answers the S3 client's GETs: the object sits at bucket/key.
    std::fs::create_dir(root.path().join("bucket")).unwrap();
    std::fs::copy(root.path().join("mixed.safetensors"), root.path().join("bucket/mixed.safetensors")).unwrap();
    let Some(nginx) = Nginx::start(root.path()) else { return };
    let redirecting = FaultProxy::start(nginx.port);
    let elsewhere = FaultProxy::start(nginx.port); // another port: another origin
    let away = Fault::Redirect { origin: format!("http://127.0.0.1:{}", elsewhere.port) };

    // A web server may send the client to another host (a CDN): followed.
    redirecting.set_steady(Some(away.clone()));
    let file = RemoteFile::open_with(&redirecting.url("mixed.safetensors"), &fast_retries(1)).unwrap();
    assert_same_as_local(&file, &root.path().join("mixed.safetensors"));
    assert!(!elsewhere.seen().is_empty());

    // An S3 endpoint is followed on its own origin only, so its credentials
    // (here the session token, which reqwest would pass on) stay there.
    redirecting.reset();
    elsewhere.reset();
    let token = "session-token-that-must-stay-home";
    let s3 = RemoteOptions {
        storage_options: [
            ("aws_endpoint", format!("http://127.0.0.1:{}", redirecting.port)),
            ("aws_access_key_id", "key".into()),
            ("aws_secret_access_key", "secret".into()),
            ("aws_session_token", token.into()),
            ("aws_region", "us-east-1".into()),
            ("aws_virtual_hosted_style_request", "false".into()),
            ("allow_http", "true".into()),
        ]
        .map(|(k, v)| (k.to_owned(), v))
        .into(),
        ..fast_retries(1)
    };
    redirecting.schedule([Fault::Redirect { origin: format!("http://127.0.0.1:{}", redirecting.port) }]);
    let file = RemoteFile::open_with("s3://bucket/mixed.safetensors", &s3).unwrap();
    assert_eq!(redirecting.seen().len(), 2, "{:?}", redirecting.seen());
    assert!(redirecting.seen().iter().all(|seen| seen.head.contains(token)));
    redirecting.set_steady(Some(away));
    let err = file.read_tensor("embed.weight").map(|data| data.len()).unwrap_err();
    assert!(matches!(err, RemoteError::Redirected { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains(&format!("127.0.0.1:{}/bucket/mixed.safetensors", elsewhere.port)) && text.contains("another host"), "{text}");
    assert!(elsewhere.seen().is_empty(), "the credentials went to another host: {:?}", elsewhere.seen());

    // Redirects without end on the same host are not called "another host".
    redirecting.set_steady(Some(Fault::Redirect { origin: format!("http://127.0.0.1:{}", redirecting.port) }));
    let err = file.read_tensor("embed.weight").map(|data| data.len()).unwrap_err();
    assert!(!matches!(err, RemoteError::Redirected { .. }) && err.to_string().contains("307"), "{err}");
}

#[test]
fn a_column_of_a_tall_tensor_is_read_in_batches_of_runs() {
    // 68 MB: past the 64 MiB a slice's span is read whole up to, and a
    // column fills a quarter of it, so it goes run by run (17 million of
    // them), a batch at a time.
    let dir = tempfile::Builder::new().prefix("tensafe-http-tall").tempdir().unwrap();
    let rows = 17_000_000usize;
    let data: Vec<u8> = (0..rows * 4).map(|i| (i % 251) as u8).collect();
    let tensor = tensafe::RawTensor { dtype: tensafe::Dtype::U8, shape: &[rows, 4], data: &data };
    tensafe::serialize_to_file([("x", tensor)], None, dir.path().join("tall.safetensors")).unwrap();
    drop(data);
    let Some(nginx) = Nginx::start(dir.path()) else { return };
    let file = RemoteFile::open(&nginx.url("tall.safetensors")).unwrap();
    let local = PreadFile::open(dir.path().join("tall.safetensors")).unwrap();
    let column = [SliceIndex::FULL, SliceIndex::Index(1)];
    let plan = SlicePlan::new(tensafe::Dtype::U8, &[rows, 4], &column).unwrap();
    assert!(!plan.reads_as_span() && plan.num_ranges() == rows);
    let peak = || {
        // SAFETY: getrusage fills the struct it is given.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) }, 0);
        usage.ru_maxrss as usize * 1024
    };
    let mut remote = vec![0u8; plan.byte_len()];
    let before = peak();
    file.read_slice_into("x", &plan, &mut remote).unwrap();
    // A list of every run took about 140 bytes a run: 2.3 GB here.
    assert!(peak() < before + (512 << 20), "the peak grew by {} MB", (peak() - before) >> 20);
    let mut expected = vec![0u8; plan.byte_len()];
    plan.copy_into(&local.read_tensor("x").unwrap(), &mut expected).unwrap();
    assert!(remote == expected, "the column differs");
}
