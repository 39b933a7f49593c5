"""Metric points and artifact files on their way to the tracking store, kept until it takes them.

A tracking server that goes away mid-run (restart, network) must neither stop training nor
leave holes in the run: what it refuses for a transient reason stays here and is re-sent by a
background thread, then flushed before the run ends; what it cannot take is listed by step.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

log = logging.getLogger(__name__)
RETRY_INTERVAL_S = 2.0
BATCH = 1000  # MLflow's log_batch limit on metrics per request
# MLflow's REST client wraps refused connections and exhausted retries as INTERNAL_ERROR.
TRANSIENT_CODES = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")
T = TypeVar("T")


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` says the store is unreachable or busy, not that the data is wrong."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, (requests.RequestException, ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, MlflowException) and exc.error_code in TRANSIENT_CODES


@dataclass
class RunOutbox:
    """What one run still has to send, and how its sending went."""

    metrics: list[Any] = field(default_factory=list)  # mlflow.entities.Metric
    files: list[tuple[str, str | None]] = field(default_factory=list)
    rejected: list[Any] = field(default_factory=list)  # refused for good by the store
    counted: int = 0  # leading pending points already counted in ``retried``
    retried: int = 0  # metric points that waited for at least one failed send
    outage_s: float = 0.0


class Outbox:
    """Per-run queues of metric points and files, sent by the caller or a background thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the queues
        self._send_lock = threading.Lock()  # one sender at a time: no point goes twice
        self._runs: dict[str, RunOutbox] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._down_since: float | None = None

    def put(self, run_id: str, metrics: list[Any] = (), files: list[tuple[str, str | None]] = (),
            background: bool = False) -> None:
        """Queue points and files; send now (``background=False``) or wake the sender thread."""
        with self._lock:
            box = self._runs.setdefault(run_id, RunOutbox())
            box.metrics.extend(metrics)
            box.files.extend(files)
        if background:
            self._start_thread()
            self._wake.set()
        else:
            self.send(run_id)

    def pending(self, run_id: str) -> int:
        """Metric points and files of ``run_id`` that the store has not yet confirmed."""
        with self._lock:
            box = self._runs.get(run_id)
            return len(box.metrics) + len(box.files) if box else 0

    def send(self, run_id: str) -> bool:
        """Try to send everything queued for ``run_id``; True when nothing is left."""
        import mlflow

        client = mlflow.MlflowClient()
        with self._send_lock:
            box = self._runs.get(run_id)
            if box is None or not (box.metrics or box.files):
                return True  # nothing to send says nothing about the server
            try:
                while box.metrics:
                    self._send_metrics(client, run_id, box)
                while box.files:
                    path, folder = box.files[0]
                    client.log_artifact(run_id, path, folder)
                    with self._lock:
                        box.files.pop(0)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._failed(run_id, box, exc)
                return False
            self._recovered(box)
            return True

    def _send_metrics(self, client: Any, run_id: str, box: RunOutbox) -> None:
        with self._lock:
            batch = box.metrics[:BATCH]
        try:
            client.log_batch(run_id, metrics=batch, synchronous=True)
        except Exception as exc:
            if is_transient(exc):
                raise
            box.rejected.extend(batch)  # kept for the end-of-run report
            log.error("the tracking store refused %d metric points of run %s: %s", len(batch),
                      run_id, str(exc).splitlines()[0][:300])
        with self._lock:
            del box.metrics[:len(batch)]
            box.counted = max(0, box.counted - len(batch))

    def _failed(self, run_id: str, box: RunOutbox, exc: BaseException) -> None:
        with self._lock:
            box.retried += len(box.metrics) - box.counted
            box.counted = len(box.metrics)
            held, files = len(box.metrics), len(box.files)
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("tracking store unreachable (%s); holding %d metric points and %d files "
                        "of run %s and retrying every %.0f s; training goes on",
                        str(exc).splitlines()[0][:200], held, files, run_id, RETRY_INTERVAL_S)

    def _recovered(self, box: RunOutbox) -> None:
        if self._down_since is None:
            return
        outage = time.monotonic() - self._down_since
        self._down_since = None
        with self._lock:
            for other in self._runs.values():
                other.outage_s += outage
        log.warning("tracking store back after %.1f s; the held metric points and files are "
                    "logged", outage)

    def drain(self, run_id: str, timeout_s: float) -> RunOutbox:
        """Send ``run_id``'s queue, retrying for up to ``timeout_s``; forget and return it."""
        deadline = time.monotonic() + timeout_s
        while not self.send(run_id) and time.monotonic() < deadline:
            time.sleep(RETRY_INTERVAL_S)
        with self._lock:
            return self._runs.pop(run_id, RunOutbox())

    def _start_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="atari-vae-outbox",
                                            daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            self._wake.wait(RETRY_INTERVAL_S)
            self._wake.clear()
            with self._lock:
                waiting = [rid for rid, box in self._runs.items() if box.metrics or box.files]
            for run_id in waiting:
                with contextlib.suppress(Exception):  # reported by send; the owner drains it
                    self.send(run_id)


def retry_while_unreachable(what: str, call: Callable[[], T], timeout_s: float) -> T:
    """``call()``, retried every few seconds while the store is unreachable, up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    warned = False
    while True:
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() >= deadline:
                raise
            if not warned:
                log.warning("%s: tracking store unreachable (%s); retrying for up to %.0f s",
                            what, str(exc).splitlines()[0][:200], timeout_s)
                warned = True
            time.sleep(RETRY_INTERVAL_S)


def describe_missing(metrics: list[Any]) -> str:
    """'val/loss steps 3, 4; train/loss step 3' for the points in ``metrics``."""
    steps: dict[str, list[int]] = defaultdict(list)
    for m in metrics:
        steps[m.key].append(m.step)
    return "; ".join(f"{key} step{'s' if len(s) > 1 else ''} {', '.join(map(str, sorted(s)))}"
                     for key, s in sorted(steps.items()))
