"""Metric points and files survive a tracking server outage, or the run says what is missing.

A real `mlflow server` (SQLite backend, proxied artifacts) on a free loopback port, killed and
restarted around real logging calls.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import requests

from atari_vae import tracking
from atari_vae.errors import AtariVaeError
from tests.conftest import free_port

pytestmark = pytest.mark.slow
START_S = 400  # a cold MLflow server takes a minute or more on two busy cores


class Server:
    """`mlflow server` in its own process group; ``kill`` is a crash, ``start`` a restart."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        mlflow_cli = Path(sys.executable).with_name("mlflow")
        command = [str(mlflow_cli), "server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--workers", "1", "--backend-store-uri", f"sqlite:///{self.folder}/mlflow.db",
                   "--serve-artifacts", "--artifacts-destination", str(self.folder / "art")]
        with (self.folder / "server.log").open("a") as log:
            self.proc = subprocess.Popen(command, cwd=self.folder, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
        deadline = time.monotonic() + START_S
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{self.url}/health", timeout=10).ok:
                    return
            assert self.proc.poll() is None and time.monotonic() < deadline, \
                (self.folder / "server.log").read_text()[-3000:]
            time.sleep(1)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("mlflow-server"))
    try:
        server.start()
        yield server
    finally:
        server.kill()


@pytest.fixture
def on_server(server: Server, monkeypatch: pytest.MonkeyPatch) -> Server:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    if server.proc.poll() is not None:
        server.start()
    tracking.configure("outbox-test")
    return server


def test_points_and_files_logged_during_an_outage_arrive_once_the_server_is_back(
        on_server, tmp_path, caplog):
    image = tmp_path / "reconstructions_epoch_2.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    with tracking.tracked_run("outage", {"optuna_trial": 3}) as run:
        tracking.log_metrics({"val_loss": 3.0, "lr": 0.1}, step=1, per_epoch=True)
        on_server.kill()
        for epoch in (2, 3):
            tracking.log_metrics({"val_loss": 3.0 - epoch, "lr": 0.1}, step=epoch,
                                 per_epoch=True)
        tracking.log_files([image], "reconstructions")
        assert tracking.OUTBOX.pending(run.info.run_id) >= 5  # 4 points and the file, held
        # A server back within MLflow's own HTTP retries would take the points first time;
        # come back only once the outbox has found it away.
        deadline = time.monotonic() + 60
        while "tracking store unreachable" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "tracking store unreachable" in caplog.text
        # Logging never waits for the server: only the outbox's own thread tries to send.
        assert {r.threadName for r in caplog.records
                if "unreachable" in r.getMessage()} == {"atari-vae-outbox"}
        on_server.start()
    client = mlflow.MlflowClient()
    done = client.get_run(run.info.run_id)
    assert done.info.status == "FINISHED"
    assert done.data.tags["optuna_trial"] == "3"  # an int tag, accepted as a string
    for key in ("val/loss", "train/lr"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == \
            [1, 2, 3], key
    assert [a.path for a in client.list_artifacts(run.info.run_id, "reconstructions")] == \
        ["reconstructions/reconstructions_epoch_2.png"]
    assert int(done.data.tags["tracking_retried_points"]) >= 4


def test_a_run_whose_server_stays_away_ends_with_an_error_naming_the_lost_steps(
        on_server, monkeypatch):
    monkeypatch.setenv(tracking.RETRY_ENV, "3")
    with pytest.raises(AtariVaeError) as raised, tracking.tracked_run("lost") as run:
        tracking.log_metrics({"val_loss": 1.0}, step=1, per_epoch=True)
        deadline = time.monotonic() + 120
        # the sender's confirmation, not the server's copy: a kill between the commit and the
        # reply leaves step 1 unconfirmed, and the run rightly names it among the lost
        while tracking.OUTBOX.pending(run.info.run_id):
            assert time.monotonic() < deadline, "step 1 never reached the server"
            time.sleep(0.5)
        on_server.kill()
        tracking.log_metrics({"val_loss": 0.5}, step=2, per_epoch=True)
    assert "val/loss step 2" in str(raised.value) and "RUNNING" in str(raised.value)
    on_server.start()
    left = mlflow.MlflowClient().get_run(run.info.run_id)
    assert left.info.status != "FINISHED"  # never a silent FINISHED with a hole
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(
        run.info.run_id, "val/loss")] == [1]
