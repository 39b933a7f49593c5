"""`atari-vae serve`: a real server process on loopback, real HTTP requests, its limits."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import torch
import yaml

from atari_vae import registry, tracking
from atari_vae.envs import FRAME_SHAPE
from atari_vae.model import VAE
from tests.conftest import REPO, free_port

LATENT = 8
MAX_FRAMES = 4
START_TIMEOUT_S = 180  # two busy cores: importing torch alone can take 20 s


@contextlib.contextmanager
def serving(model_uri: str, cwd: Path, *extra: str) -> Iterator[str]:
    """Run `atari-vae serve` on a free loopback port; yield its base URL; always stop it."""
    port = free_port()
    log_path = cwd / f"serve-{port}.log"
    command = [sys.executable, "-m", "atari_vae", "serve", "--model_uri", model_uri,
               "--port", str(port), "--max_frames", str(MAX_FRAMES), *extra]
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)},
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/ping", timeout=5).ok:
                    break
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        proc.log_path = log_path
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def seeded_vae() -> VAE:
    torch.manual_seed(0)
    return VAE(FRAME_SHAPE, LATENT).eval()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One server for the limit tests: a .pt state_dict, 4 frames and 1 MiB a request."""
    folder = tmp_path_factory.mktemp("serve")
    torch.save(seeded_vae().state_dict(), folder / "model.pt")
    with serving(str(folder / "model.pt"), folder, "--max_request_mb", "1") as url:
        yield url


def frames(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *FRAME_SHAPE), dtype=np.float32)


def post(url: str, doc: object) -> requests.Response:
    return requests.post(f"{url}/invocations", data=json.dumps(doc),
                         headers={"Content-Type": "application/json"}, timeout=120)


def test_frames_get_the_models_latent_means(server):
    x = frames(3)
    response = post(server, {"inputs": x.tolist()})
    assert response.status_code == 200, response.text
    with torch.no_grad():
        expected = seeded_vae().encode(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(np.array(response.json()["predictions"]), expected, atol=1e-5)
    info = requests.get(f"{server}/version", timeout=30).json()
    assert info["latent_dim"] == LATENT and info["max_frames"] == MAX_FRAMES


def test_more_frames_than_max_frames_get_413(server):
    # all-zero frames keep the body under the byte limit, so the frame count is what refuses it
    response = post(server, {"inputs": np.zeros((MAX_FRAMES + 1, *FRAME_SHAPE)).tolist()})
    assert response.status_code == 413
    assert f"at most {MAX_FRAMES}" in response.json()["error"]


def raw_request(url: str, head: str, body_chunks: list[bytes] = ()) -> str:
    """Send ``head`` then ``body_chunks`` on a plain socket; the status line that comes back."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head.encode())
        with contextlib.suppress(OSError):  # the server may close once it has refused
            for chunk in body_chunks:
                sock.sendall(chunk)
        return sock.recv(65536).decode(errors="replace").split("\r\n")[0]


def test_a_declared_body_over_the_limit_is_refused_with_413_before_it_is_sent(server):
    head = ("POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {50 << 20}\r\n\r\n")
    assert " 413 " in raw_request(server, head)  # no byte of the 50 MiB body was sent


def test_a_chunked_body_over_the_limit_gets_413(server):
    head = ("POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n")
    piece = b" " * (256 << 10)
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    assert " 413 " in raw_request(server, head, [chunk] * 8)  # 2 MiB, no length declared


@pytest.mark.parametrize("value, reason", [
    ("NaN", "NaN or infinite"), ("Infinity", "NaN or infinite"), ("-Infinity", "NaN or infinite"),
    ("1.5", "frames are in [0, 1]"), ("-0.01", "frames are in [0, 1]")])
def test_non_finite_or_out_of_range_values_get_400(server, value, reason):
    body = json.dumps({"inputs": frames(1).tolist()})
    body = body.replace(body[body.index("[[[[") + 4:].split(",")[0], value, 1)
    response = requests.post(f"{server}/invocations", data=body, timeout=120,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and reason in response.json()["error"], response.text


@pytest.mark.parametrize("body, reason", [
    ("not json", "not JSON"), (json.dumps([1, 2]), '{"inputs"'),
    (json.dumps({"inputs": np.zeros((1, 3, 32, 32)).tolist()}), "shape (N, 3, 64, 64)"),
    (json.dumps({"inputs": [[1, 2], [3]]}), "nested lists")])
def test_malformed_requests_get_400_saying_what_is_expected(server, body, reason):
    response = requests.post(f"{server}/invocations", data=body, timeout=120)
    assert response.status_code == 400 and reason in response.json()["error"], response.text
    assert requests.get(f"{server}/ping", timeout=30).ok  # and the server goes on


def tamper(model_uri: str, marker: Path) -> None:
    """Make the stored model name a loader module of its own that writes ``marker``."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    store = Path(mlflow.MlflowClient().get_logged_model(model_uri.split("/")[-1]).artifact_location
                 .removeprefix("file://"))
    (store / "code").mkdir()
    (store / "code" / "evil_loader.py").write_text(
        f"from pathlib import Path\n\nclass Model:\n    def predict(self, x, params=None):\n"
        f"        return x\n\ndef _load_pyfunc(path, config=None):\n"
        f"    Path({str(marker)!r}).write_text('code from the artifact store ran')\n"
        f"    return Model()\n")
    meta = yaml.safe_load((local / "MLmodel").read_text())
    meta["flavors"]["python_function"].update(loader_module="evil_loader", code="code")
    (store / "MLmodel").write_text(yaml.safe_dump(meta))


def test_a_tampered_artifact_store_runs_no_code_on_the_serving_host(tmp_path):
    tracking.configure("serve-test")  # this test's own store: no experiment id from an earlier one
    with mlflow.start_run():
        info = registry.log_vae_model(seeded_vae(), {"game": "Breakout"})
    version = mlflow.register_model(info.model_uri, "served-vae")
    mlflow.MlflowClient().set_registered_model_alias("served-vae", "champion", version.version)
    marker = tmp_path / "pwned"
    tamper(info.model_uri, marker)
    mlflow.pyfunc.load_model(info.model_uri)  # MLflow's own loader runs the planted module
    assert marker.exists(), "the tampering did not take: this test would prove nothing"
    marker.unlink()

    with serving("models:/served-vae@champion", tmp_path) as url:
        response = post(url, {"inputs": frames(2).tolist()})
    assert response.status_code == 200, response.text
    with torch.no_grad():
        expected = seeded_vae().encode(torch.from_numpy(frames(2)))[0].numpy()
    np.testing.assert_allclose(np.array(response.json()["predictions"]), expected, atol=1e-5)
    assert not marker.exists()
