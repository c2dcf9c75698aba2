"""Uploads to a loopback SeaweedFS: `tensafe.torch.save_file(sd, "s3://…")`
against boto3's `upload_fileobj` of the same bytes (already in memory, 8 MiB
parts, 16 threads), with the peak RSS growth of tensafe's upload (its parts
in flight, never the whole file). Checks the uploaded bytes.

    .venv/bin/python bench/upload_bench.py [GiB]
"""

import io
import os
import pathlib
import shutil
import sys
import tempfile
import threading
import time

import boto3
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python", "tests"))
import test_remote as tr  # noqa: E402  (server helpers shared with the tests)

import tensafe.torch as ts  # noqa: E402


def rss() -> int:
    """Resident memory of this process, in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    gib = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    work = tempfile.mkdtemp(prefix="tensafe-upload-bench")
    weed = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
    process, endpoint, client = tr.start_seaweed(weed, pathlib.Path(work), bucket="bench", volume_size_limit_mb=2048)
    os.environ.update({"AWS_ACCESS_KEY_ID": tr.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": tr.SECRET_KEY,
                       "AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"})
    try:
        tensors = int(gib * 16)
        sd = {f"layer.{i}": torch.randn((64 << 20) // 4) for i in range(tensors)}  # 64 MiB each
        for _ in range(2):
            base = rss()
            peak, done = [base], threading.Event()

            def watch() -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], rss())
                    time.sleep(0.01)

            watcher = threading.Thread(target=watch)
            watcher.start()
            start = time.perf_counter()
            ts.save_file(sd, "s3://bench/tensafe.safetensors")
            took = time.perf_counter() - start
            done.set()
            watcher.join()
            size = client.head_object(Bucket="bench", Key="tensafe.safetensors")["ContentLength"]
            print(f"tensafe save_file → s3: {size / 2**20:.0f} MiB in {took:.2f} s ({size / took / 2**20:.0f} MiB/s), "
                  f"peak RSS growth {(peak[0] - base) / 2**20:.0f} MiB")
        data = ts.save(sd)
        config = boto3.s3.transfer.TransferConfig(multipart_chunksize=8 << 20, max_concurrency=16)
        for _ in range(2):
            start = time.perf_counter()
            client.upload_fileobj(io.BytesIO(data), "bench", "boto3.safetensors", Config=config)
            print(f"boto3 upload_fileobj of the same bytes: {len(data) / (time.perf_counter() - start) / 2**20:.0f} MiB/s")
        assert client.get_object(Bucket="bench", Key="tensafe.safetensors")["Body"].read() == data
        print("uploaded bytes == tensafe.torch.save(sd)")
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
