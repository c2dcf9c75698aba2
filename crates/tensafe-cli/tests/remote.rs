//! `tensafe inspect URL` and `tensafe verify URL` against real servers on
//! 127.0.0.1: nginx (http://) and SeaweedFS (s3://, configured through the
//! AWS_* environment variables as a user would).

#[path = "../../tensafe-remote/tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{Nginx, Seaweed, Tensor};
use tensafe::{Dtype, RawTensor};

fn tensafe(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tensafe"));
    command.args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("the binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A single file, a sharded checkpoint and a file with a bad BOOL.
fn fixtures(root: &Path) {
    common::write_file(&root.join("mixed.safetensors"), &common::mixed_tensors());
    let mut tensors = common::mixed_tensors();
    tensors.push(Tensor::new("big", Dtype::F16, &[300, 700], 11));
    std::fs::create_dir(root.join("ckpt")).unwrap();
    tensafe::save_sharded(tensors.iter().map(Tensor::raw), root.join("ckpt"), 300_000, None).unwrap().expect("shards");
    tensafe::serialize_to_file([("m", RawTensor { dtype: Dtype::Bool, shape: &[3], data: &[0, 1, 2] })], None, root.join("bad-bool.safetensors")).unwrap();
    // A folder with one model file (no index), and a safetensors file named `.json`.
    std::fs::create_dir(root.join("single")).unwrap();
    std::fs::copy(root.join("mixed.safetensors"), root.join("single").join(tensafe::SINGLE_FILE)).unwrap();
    std::fs::copy(root.join("mixed.safetensors"), root.join("named.json")).unwrap();
}

/// The AWS_* variables a user would set for the SeaweedFS server.
fn aws_env(weed: &Seaweed, secret: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", weed.endpoint()),
        ("AWS_ACCESS_KEY_ID", common::ACCESS_KEY.to_owned()),
        ("AWS_SECRET_ACCESS_KEY", secret.to_owned()),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_ALLOW_HTTP", "true".to_owned()),
    ]
}

#[test]
fn inspect_and_verify_http_urls() {
    let root = tempfile::tempdir().unwrap();
    fixtures(root.path());
    let Some(nginx) = Nginx::start(root.path()) else { return };

    // The same report as for the local file, the path aside.
    let local = tensafe(&["inspect", root.path().join("mixed.safetensors").to_str().unwrap()], &[]);
    let remote = tensafe(&["inspect", &nginx.url("mixed.safetensors")], &[]);
    assert!(remote.status.success(), "{}", String::from_utf8_lossy(&remote.stderr));
    let body = |o: &Output| stdout(o).split_once('\n').map(|(_, rest)| rest.to_owned()).unwrap();
    assert_eq!(body(&remote), body(&local));
    assert!(stdout(&remote).starts_with(&format!("{}: 7 tensors", nginx.url("mixed.safetensors"))), "{}", stdout(&remote));

    // A sharded checkpoint by its index or its directory URL: same JSON.
    let local = tensafe(&["inspect", "--json", root.path().join("ckpt").to_str().unwrap()], &[]);
    for url in [nginx.url("ckpt/model.safetensors.index.json"), nginx.url("ckpt/")] {
        let remote = tensafe(&["inspect", "--json", &url], &[]);
        assert!(remote.status.success(), "{url}: {}", String::from_utf8_lossy(&remote.stderr));
        assert_eq!(stdout(&remote), stdout(&local), "{url}");
    }

    let ok = tensafe(&["verify", &nginx.url("mixed.safetensors"), root.path().join("mixed.safetensors").to_str().unwrap()], &[]);
    assert!(ok.status.success(), "{}", stdout(&ok));
    assert!(stdout(&ok).starts_with(&format!("OK    {}: 7 tensors", nginx.url("mixed.safetensors"))), "{}", stdout(&ok));

    // A checkpoint: every shard, by the index or the directory URL, as locally.
    let local = tensafe(&["verify", root.path().join("ckpt").to_str().unwrap()], &[]);
    assert!(local.status.success() && stdout(&local).contains(" shards, "), "{}", stdout(&local));
    for url in [nginx.url("ckpt/model.safetensors.index.json"), nginx.url("ckpt/")] {
        let remote = tensafe(&["verify", &url], &[]);
        assert!(remote.status.success(), "{url}: {}", stdout(&remote));
        let counts = |o: &Output| stdout(o).split_once(": ").unwrap().1.split(" bytes read").next().unwrap().to_owned();
        assert_eq!(counts(&remote), counts(&local), "{url}");
    }

    // Every request is counted: a folder without an index costs the probe
    // for one more than its model file alone. A safetensors file named
    // `.json` is one file, as locally, not an index.
    let requests = |url: &str| {
        let out = tensafe(&["verify", url], &[]);
        assert!(out.status.success(), "{url}: {}", stdout(&out));
        stdout(&out).rsplit_once(", ").unwrap().1.trim_end().trim_end_matches(" requests)").parse::<u64>().unwrap()
    };
    assert_eq!(requests(&nginx.url("single/")), requests(&nginx.url("single/model.safetensors")) + 1);
    assert_eq!(requests(&nginx.url("named.json")), requests(&nginx.url("mixed.safetensors")) + 1, "the index attempt, then the file");
    let named = stdout(&tensafe(&["verify", &nginx.url("named.json")], &[]));
    assert!(named.contains(": 7 tensors") && !named.contains("shards"), "{named}");

    let bad = tensafe(&["verify", &nginx.url("bad-bool.safetensors"), &nginx.url("missing.safetensors")], &[]);
    assert_eq!(bad.status.code(), Some(1));
    let text = stdout(&bad);
    assert!(text.contains("FAIL  ") && text.contains("BOOL tensor `m` holds the byte 2 at element 2"), "{text}");
    assert!(text.contains("missing.safetensors: not found (HTTP 404)"), "{text}");

    let missing = tensafe(&["inspect", &nginx.url("missing.safetensors")], &[]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found (HTTP 404)"));
}

#[test]
fn inspect_and_verify_s3_urls_with_aws_environment_variables() {
    let root = tempfile::tempdir().unwrap();
    fixtures(root.path());
    let Some(weed) = Seaweed::start("models") else { return };
    let options = weed.options();
    for entry in std::fs::read_dir(root.path().join("ckpt")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        common::put(&options, &weed.url(&format!("ckpt/{name}")), std::fs::read(&path).unwrap()).unwrap();
    }
    let env = |secret: &str| aws_env(&weed, secret);
    let good = env(common::SECRET_KEY);
    let local = tensafe(&["inspect", "--json", root.path().join("ckpt").to_str().unwrap()], &[]);
    let remote = tensafe(&["inspect", "--json", &weed.url("ckpt/")], &good);
    assert!(remote.status.success(), "{}", String::from_utf8_lossy(&remote.stderr));
    assert_eq!(stdout(&remote), stdout(&local));

    let index = tensafe::ShardIndex::parse(&std::fs::read_to_string(root.path().join("ckpt/model.safetensors.index.json")).unwrap()).unwrap();
    let shard = weed.url(&format!("ckpt/{}", index.weight_map["big"]));
    let ok = tensafe(&["verify", &shard], &good);
    assert!(ok.status.success(), "{}", stdout(&ok));

    let denied = tensafe(&["inspect", &shard], &env("wrong-secret"));
    assert_eq!(denied.status.code(), Some(1));
    let text = String::from_utf8_lossy(&denied.stderr);
    assert!(text.contains("access denied (HTTP 403)") && text.contains("AWS_SECRET_ACCESS_KEY"), "{text}");
}

#[test]
fn reshard_diff_and_convert_with_s3_urls() {
    let root = tempfile::tempdir().unwrap();
    fixtures(root.path());
    let Some(weed) = Seaweed::start("out") else { return };
    let options = weed.options();
    let env = aws_env(&weed, common::SECRET_KEY);
    let run = |args: &[&str]| {
        let out = tensafe(args, &env);
        assert!(out.status.success(), "{args:?}: {}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
        out
    };
    let path = |p: &str| root.path().join(p).to_str().unwrap().to_owned();
    let same = |local: &str, url: &str| {
        let uploaded = common::get(&options, url).unwrap_or_else(|e| panic!("{url}: {e}"));
        assert!(uploaded == std::fs::read(path(local)).unwrap(), "{url} differs from {local}");
    };

    // Local → URL: the same files as a local reshard.
    run(&["reshard", &path("ckpt"), &path("local-shards"), "--max-shard-size", "200KB"]);
    let out = run(&["reshard", &path("ckpt"), &weed.url("shards/"), "--max-shard-size", "200KB"]);
    assert!(stdout(&out).contains(&format!("shards and model.safetensors.index.json to {}", weed.url("shards/"))), "{}", stdout(&out));
    let names: Vec<String> = std::fs::read_dir(path("local-shards")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(names.len() >= 3, "{names:?}");
    for name in &names {
        same(&format!("local-shards/{name}"), &weed.url(&format!("shards/{name}")));
    }
    // URL → local and URL → URL.
    run(&["reshard", &path("ckpt"), &path("local-one")]);
    run(&["reshard", &weed.url("shards/"), &path("from-url")]);
    assert!(std::fs::read(path("from-url/model.safetensors")).unwrap() == std::fs::read(path("local-one/model.safetensors")).unwrap());
    let out = run(&["reshard", &weed.url("shards/model.safetensors.index.json"), &weed.url("one")]);
    assert!(stdout(&out).contains(&format!("wrote {}", weed.url("one/model.safetensors"))), "{}", stdout(&out));
    same("local-one/model.safetensors", &weed.url("one/model.safetensors"));

    // diff with URLs on either side (files and checkpoints).
    let out = run(&["diff", &weed.url("one/model.safetensors"), &path("local-one/model.safetensors")]);
    assert!(stdout(&out).contains("8 identical tensors, 0 differences"), "{}", stdout(&out));
    run(&["diff", &path("local-one/model.safetensors"), &weed.url("shards/")]);
    let differs = tensafe(&["diff", &path("mixed.safetensors"), &weed.url("one/model.safetensors"), "--json"], &env);
    assert_eq!(differs.status.code(), Some(1), "{}", String::from_utf8_lossy(&differs.stderr));
    let json: serde_json::Value = serde_json::from_slice(&differs.stdout).unwrap();
    assert_eq!(json["changes"][0]["name"], "big");
    assert_eq!(json["changes"][0]["change"], "added");
    let missing = tensafe(&["diff", &weed.url("nothing.safetensors"), &path("mixed.safetensors")], &env);
    assert_eq!(missing.status.code(), Some(2));

    // convert to a URL: the bytes of a local conversion.
    let example = common::workspace_root().join("examples/tiny_mlp.pt");
    let example = example.to_str().unwrap();
    run(&["convert", example, &path("tiny.safetensors")]);
    run(&["convert", example, &weed.url("tiny.safetensors")]);
    same("tiny.safetensors", &weed.url("tiny.safetensors"));
    run(&["convert", example, &weed.url("converted/")]);
    same("tiny.safetensors", &weed.url("converted/model.safetensors"));
    run(&["diff", example, &weed.url("tiny.safetensors")]);
    let refused = tensafe(&["convert", &weed.url("tiny.safetensors"), &path("x.safetensors")], &env);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("the input must be a local file"));

    // Web servers are read-only.
    let read_only = tensafe(&["reshard", &path("ckpt"), "http://127.0.0.1:1/x/"], &env);
    assert_eq!(read_only.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&read_only.stderr).contains("read-only"), "{}", String::from_utf8_lossy(&read_only.stderr));
}

/// What the SeaweedFS filer lists under `path` (its JSON listing).
fn filer_listing(weed: &Seaweed, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", weed.filer_port)).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nAccept: application/json\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn an_interrupted_upload_is_aborted() {
    let Some(weed) = Seaweed::start("uploads") else { return };
    let dir = tempfile::tempdir().unwrap();
    // 1 GiB of zeros (a sparse file): one multipart upload of many parts.
    let input = dir.path().join("big.safetensors");
    common::write_sparse_file(&input, 1 << 30);

    let mut command = Command::new(env!("CARGO_BIN_EXE_tensafe"));
    command.args(["reshard", input.to_str().unwrap(), &weed.url("out/"), "--max-shard-size", "5GB"]);
    command.envs(aws_env(&weed, common::SECRET_KEY)).stderr(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    // SeaweedFS keeps an unfinished upload's parts in the bucket's `.uploads` folder.
    let uploads = format!("/buckets/{}/.uploads/", weed.bucket);
    let in_progress = || filer_listing(&weed, &uploads).contains(&format!("\"FullPath\":\"{uploads}"));
    // Once a part is there, tensafe has the upload (its creation was answered).
    let a_part_arrived = || {
        let listing = filer_listing(&weed, &uploads);
        let Some(at) = listing.find(&format!("\"FullPath\":\"{uploads}")) else { return false };
        let upload = listing[at + 12..].split('"').next().unwrap_or_default().to_owned();
        filer_listing(&weed, &format!("{upload}/")).contains(&format!("\"FullPath\":\"{upload}/"))
    };
    let start = std::time::Instant::now();
    while !a_part_arrived() {
        assert!(child.try_wait().unwrap().is_none(), "the upload ended before it could be interrupted");
        assert!(start.elapsed() < std::time::Duration::from_secs(60), "no upload started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let output = child.wait_with_output().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&output.status), Some(libc::SIGINT), "{:?}", output.status);
    assert!(output.stderr.is_empty(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(!in_progress(), "the interrupted upload was not aborted: {}", filer_listing(&weed, &uploads));
    let missing = tensafe_remote::RemoteFile::open_with(&weed.url("out/model.safetensors"), &weed.options()).map(|_| ()).unwrap_err();
    assert!(missing.is_not_found(), "{missing}");
}

/// An S3 endpoint that starts multipart uploads and then answers nothing:
/// each part and each abort is read, noted, and held unanswered. Anything
/// else is 404. Notes each request line.
fn start_unanswering_store() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let noted = seen.clone();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let noted = noted.clone();
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(client.try_clone().unwrap());
                let mut client = client;
                loop {
                    let mut request = String::new();
                    if reader.read_line(&mut request).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut length = 0;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':')
                            && name.eq_ignore_ascii_case("content-length")
                        {
                            length = value.trim().parse().unwrap();
                        }
                    }
                    std::io::copy(&mut (&mut reader).take(length), &mut std::io::sink()).unwrap();
                    let request = request.trim_end().to_owned();
                    noted.lock().unwrap().push(request.clone());
                    let answer = if request.starts_with("POST ") && request.contains("?uploads") {
                        let body = "<InitiateMultipartUploadResult><Bucket>held</Bucket><Key>out/model.safetensors</Key><UploadId>1</UploadId></InitiateMultipartUploadResult>";
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len())
                    } else if request.starts_with("PUT ") || request.starts_with("DELETE ") {
                        std::thread::sleep(std::time::Duration::from_secs(3600));
                        return;
                    } else {
                        let body = "<Error><Code>NoSuchKey</Code></Error>";
                        format!("HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\n\r\n{body}", body.len())
                    };
                    if client.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

#[test]
fn a_second_ctrl_c_does_not_wait_for_the_aborts() {
    let (port, seen) = start_unanswering_store();
    let dir = tempfile::tempdir().unwrap();
    // 256 MiB of zeros (a sparse file): a multipart upload of 8 MiB parts.
    let input = dir.path().join("big.safetensors");
    common::write_sparse_file(&input, 256 << 20);
    let mut command = Command::new(env!("CARGO_BIN_EXE_tensafe"));
    command.args(["reshard", input.to_str().unwrap(), "s3://held/out/", "--max-shard-size", "5GB"]);
    command.envs([
        ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
        ("AWS_ACCESS_KEY_ID", "key".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "secret".to_owned()),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_ALLOW_HTTP", "true".to_owned()),
    ]);
    let mut child = command.stderr(std::process::Stdio::piped()).spawn().unwrap();
    let signal = |child: &std::process::Child| {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    };
    let count = |method: &str| seen.lock().unwrap().iter().filter(|line| line.starts_with(method)).count();
    let wait_for = |what: &str, ready: &dyn Fn() -> bool| {
        let start = std::time::Instant::now();
        while !ready() {
            assert!(start.elapsed() < std::time::Duration::from_secs(60), "no {what}: {:?}", seen.lock().unwrap());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    // A part arrived: the upload's creation was answered, tensafe knows it.
    wait_for("part", &|| count("PUT ") > 0);
    signal(&child);
    // The first Ctrl-C aborts the upload, and waits (up to 10 s) for the
    // store, which never answers.
    wait_for("abort", &|| count("DELETE ") > 0);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "the first Ctrl-C did not wait for the abort");
    let second = std::time::Instant::now();
    signal(&child);
    let output = child.wait_with_output().unwrap();
    let took = second.elapsed();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&output.status), Some(libc::SIGINT), "{:?}", output.status);
    assert!(took < std::time::Duration::from_secs(5), "the second Ctrl-C waited {took:?} (the aborts' limit is 10 s)");
    assert!(output.stderr.is_empty(), "{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn a_user_agent_that_cannot_be_sent_is_refused_from_the_environment_too() {
    let env = [
        ("AWS_ENDPOINT_URL", "http://127.0.0.1:9".to_owned()),
        ("AWS_ALLOW_HTTP", "true".to_owned()),
        ("AWS_ACCESS_KEY_ID", "key".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "secret".to_owned()),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_USER_AGENT", "my-tool\r\nX-Injected: 1".to_owned()),
    ];
    let out = tensafe(&["inspect", "s3://bucket/model.safetensors"], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("user_agent") && stderr.contains("cannot configure"), "{stderr}");
}
