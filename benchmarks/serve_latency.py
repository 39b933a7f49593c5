"""Latency of `atari-vae serve` over loopback HTTP, and how fast it refuses oversized requests.

    .venv/bin/python benchmarks/serve_latency.py [--model_uri URI] [--repeats 20]

Without --model_uri it serves a freshly initialised VAE (latent 32) from a .pt file: the
encoder's cost does not depend on its weights. Prints the median and 90th percentile wall time
of a request with 1, 16 and 256 frames (JSON, float32 values), and of a refused 8,000-frame
request (413 from Content-Length, the body never sent).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from atari_vae.envs import FRAME_SHAPE  # noqa: E402
from atari_vae.model import VAE  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_uri: str, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "atari_vae", "serve", "--model_uri", model_uri,
               "--port", str(port)]
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/ping", timeout=5).ok:
                return proc
        except requests.RequestException:
            time.sleep(0.5)
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"the server did not start:\n{log.read_text()[-2000:]}")


def timed(call, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


def refused_request(port: int, frames: int) -> None:
    length = frames * int(np.prod(FRAME_SHAPE)) * 20
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall((f"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                      f"application/json\r\nContent-Length: {length}\r\n\r\n").encode())
        status = sock.recv(4096).split(b"\r\n")[0]
    assert b" 413 " in status, status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_uri", default="")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        uri = args.model_uri
        if not uri:
            torch.manual_seed(0)
            uri = str(Path(tmp) / "model.pt")
            torch.save(VAE(FRAME_SHAPE, 32).state_dict(), uri)
        port = free_port()
        proc = start_server(uri, port, Path(tmp) / "serve.log")
        try:
            url = f"http://127.0.0.1:{port}/invocations"
            print(f"load average {os.getloadavg()[0]:.1f}; torch threads {torch.get_num_threads()}")
            for n in (1, 16, 256):
                body = json.dumps({"inputs": np.random.default_rng(n).random(
                    (n, *FRAME_SHAPE), dtype=np.float32).tolist()})

                def call(body=body):
                    response = requests.post(url, data=body, timeout=300,
                                             headers={"Content-Type": "application/json"})
                    response.raise_for_status()

                times = timed(call, max(3, args.repeats // (1 + n // 16)))
                print(f"{n:>4} frames ({len(body) / 2**20:5.1f} MiB JSON): median "
                      f"{1000 * statistics.median(times):8.1f} ms, p90 "
                      f"{1000 * sorted(times)[int(0.9 * (len(times) - 1))]:8.1f} ms "
                      f"over {len(times)} requests")
            times = timed(lambda: refused_request(port, 8000), args.repeats)
            print(f"8000 frames declared (refused, 413): median "
                  f"{1000 * statistics.median(times):.1f} ms")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
