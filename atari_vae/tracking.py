"""MLflow runs: the tracking URI, run lifecycle (FAILED/KILLED on errors), params, metrics, images.

Registry and model (de)serialisation live in ``registry.py``; every other module is MLflow-free.
Metric points and files go through ``outbox.py``, so a tracking server outage loses nothing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from atari_vae.errors import AtariVaeError, interrupted
from atari_vae.outbox import Outbox, describe_missing, retry_while_unreachable

log = logging.getLogger(__name__)
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
CONNECT_TIMEOUT_S = 20
# How long a run waits for an unreachable tracking server before giving up on it (seconds).
RETRY_ENV = "ATARI_VAE_TRACKING_RETRY_S"
DEFAULT_RETRY_S = 600.0
KILLED_RETRY_S = 15.0  # a killed job should exit soon
OUTBOX = Outbox()

# The UI draws one chart section per name prefix, sorted by name: per-epoch curves under train/
# and val/, then the best model's end-of-run figures under val_best/ (one point each: before the
# curves, 18 of them filled the page). Internal names (loop, tune, evaluate) stay as they are.
EPOCH_KEYS = {"baseline_psnr": "val/baseline_psnr", "pruning_value": "val/pruning_value"}
RUN_KEYS = {"n_train_frames": "data/n_train_frames", "n_val_frames": "data/n_val_frames",
            "tune_seconds": "study/tune_seconds", "best_value": "study/best_value",
            "best_trial": "study/best_trial", "best_kl": "study/best_kl",
            "trial_value": "trial/value", "trial_kl": "trial/kl"}


def metric_key(name: str, per_epoch: bool = False, of_model: bool = False) -> str:
    """The name MLflow shows for an internal metric name (``val_psnr`` -> ``val/psnr``);
    ``of_model``: a logged model's figures on the validation episodes."""
    if "/" in name:  # already grouped, e.g. evaluate's Breakout/psnr
        return name
    if of_model:
        return f"val_best/{name}"
    if per_epoch:
        for section in ("train", "val"):
            if name.startswith(section + "_"):
                return f"{section}/{name[len(section) + 1:]}"
        return EPOCH_KEYS.get(name, f"train/{name}")  # lr, epoch_seconds
    if name.startswith("probe_"):  # evaluate's state probe: a section of its own
        return f"probe/{name[len('probe_'):]}"
    return RUN_KEYS.get(name, f"final/{name}")


def retry_s() -> float:
    """Seconds to keep retrying an unreachable tracking server (``$ATARI_VAE_TRACKING_RETRY_S``)."""
    try:
        return float(os.environ.get(RETRY_ENV) or DEFAULT_RETRY_S)
    except ValueError as exc:
        raise AtariVaeError(f"{RETRY_ENV} must be a number of seconds") from exc


def _is_remote() -> bool:
    return tracking_uri().startswith(("http://", "https://"))


def retrying(what: str, call: Any) -> Any:
    """``call()``, retried while the tracking server is unreachable (up to ``retry_s()``)."""
    return retry_while_unreachable(what, call, retry_s())


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the embedded SQLite store ./mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def configure(experiment_name: str | None = None) -> None:
    """Point MLflow at the tracking store (failing fast if a server is unreachable)."""
    import mlflow

    # MLflow sets its logger to INFO when imported; keep its chatter out of our log unless -v.
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        # the outbox says once that the server is away; urllib3 would warn on every retry
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    # No download progress bars inside a job's log (models are two small files), and no
    # "View run" lines on stdout: MLflow prints them at each end, with a URL that opens the
    # experiment in its GenAI view (tracked_run logs the model-training view's URL instead).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    mlflow.set_tracking_uri(uri)
    if experiment_name and not os.environ.get("MLFLOW_RUN_ID"):
        with local_store_lock("init"):  # parallel workers on a fresh mlflow.db race on its schema
            _create_sqlite_store(uri)
            _set_experiment(experiment_name)


def _create_sqlite_store(uri: str) -> None:
    """Build a new SQLite store's schema in a side file, then link it into place.

    MLflow's schema migrations commit one by one, each with an fsync: 5.2 s wall for 1.5 s CPU
    here. A side file with synchronous=OFF that appears only when complete takes 1.4 s.
    """
    path = Path(uri[len("sqlite:///"):])
    if not uri.startswith("sqlite:///") or "?" in uri or path.exists():
        return
    try:
        from mlflow.store.db.utils import _initialize_tables  # private: fall back if it moves
        from sqlalchemy import create_engine, event
    except ImportError:
        return
    side = path.with_name(f".{path.name}.{os.getpid()}.new")
    engine = create_engine(f"sqlite:///{side}")
    event.listen(engine, "connect", lambda conn, _: conn.execute("PRAGMA synchronous=OFF"))
    try:
        _initialize_tables(engine)
        engine.dispose()
        with open(side, "rb") as fh:
            os.fsync(fh.fileno())
        os.link(side, path)  # never replaces a store another process made meanwhile
    except Exception as exc:  # MLflow then creates the store itself, the slow way
        log.debug("fast creation of %s skipped: %s", path, exc)
    finally:
        engine.dispose()
        side.unlink(missing_ok=True)


def local_store_lock(purpose: str, timeout: float = 900) -> contextlib.AbstractContextManager:
    """A lock file beside a local SQLite store, shared by this machine's processes; a no-op for
    remote stores."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    db = Path(uri[len("sqlite:///"):])
    return FileLock(str(db.with_name(f".{db.name}.{purpose}.lock")), timeout=timeout)


def _check_server(uri: str) -> None:
    """One quick request instead of MLflow's minutes of retries on an unreachable server."""
    import requests

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(CONNECT_TIMEOUT_S))
    try:
        requests.get(urllib.parse.urljoin(uri + "/", "health"), timeout=CONNECT_TIMEOUT_S)
    except requests.RequestException as exc:
        raise AtariVaeError(
            f"cannot reach the MLflow tracking server at {uri} ({type(exc).__name__}); "
            f"start it or unset MLFLOW_TRACKING_URI to use ./mlflow.db") from exc


def _set_experiment(name: str, attempts: int = 5) -> None:
    """Set (creating if needed) the experiment; parallel workers may race to create it."""
    import mlflow

    for attempt in range(attempts):
        try:
            mlflow.set_experiment(name)
            return
        except Exception as exc:  # "already exists", "database is locked", migration races
            if attempt == attempts - 1:
                raise AtariVaeError(
                    f"cannot open MLflow experiment {name!r} at {tracking_uri()}: "
                    f"{str(exc).splitlines()[0]}") from exc
            time.sleep(0.5 * (attempt + 1))


def git_commit() -> str | None:
    """The commit of the checkout this package runs from, if it is one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def base_tags(job: str, games: list[str]) -> dict[str, str]:
    """Tags every run carries: job, game(s), package version, git commit."""
    from atari_vae import __version__

    tags = {"job": job, "game": ",".join(games), "atari_vae_version": __version__}
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    return tags


@contextlib.contextmanager
def tracked_run(run_name: str | None = None, tags: dict[str, Any] | None = None,
                nested: bool = False, run_id: str | None = None) -> Iterator[Any]:
    """A run that always ends: FINISHED, FAILED on an exception, KILLED on Ctrl-C (and on
    SIGTERM or SIGHUP, which the CLI turns into KeyboardInterrupt).

    Under ``mlflow run`` (MLFLOW_RUN_ID set) the top-level run is the one MLflow created. Before
    it ends, every held metric point and file is sent; what cannot be makes the run FAILED.
    """
    import mlflow

    parent = mlflow.active_run() if nested else None
    # Tag values must be strings for a tracking server (only SQLite accepts an int).
    run = retrying("starting the MLflow run", lambda: mlflow.start_run(
        run_id=run_id, run_name=None if run_id else run_name, nested=nested,
        parent_run_id=parent.info.run_id if parent else None,
        tags={k: str(v) for k, v in (tags or {}).items()}))
    try:
        yield run
    except BaseException as exc:
        _end(mlflow, "KILLED" if isinstance(exc, SystemExit) or interrupted(exc) else "FAILED")
        raise
    else:
        _end(mlflow, "FINISHED")
        if _is_remote() and not nested:
            log.info("run in the UI: %s", ui_url(run.info.experiment_id, run.info.run_id))


def ui_url(experiment_id: str, run_id: str | None = None) -> str:
    """The UI page of a run, or the runs table of an experiment in the model-training view."""
    base = f"{tracking_uri().rstrip('/')}/#/experiments/{experiment_id}"
    return f"{base}/runs/{run_id}" if run_id else f"{base}/runs?workflowType=machine_learning"


def _end(mlflow: Any, status: str) -> None:
    """Send what the run still holds, note what could not be sent, then end it."""
    run_id = mlflow.active_run().info.run_id
    box = OUTBOX.drain(run_id, KILLED_RETRY_S if status == "KILLED" else retry_s())
    unsent = [*box.metrics, *box.rejected]
    missing = "; ".join(filter(None, [describe_missing(unsent),
                                      ", ".join(f for f, _ in box.files)]))
    client = mlflow.MlflowClient()
    tags = {}
    if box.retried:
        tags.update(tracking_retried_points=str(box.retried),
                    tracking_outage_s=f"{box.outage_s:.1f}")
    incomplete = bool(missing) and status == "FINISHED"
    if missing:
        tags["unlogged"] = missing[:5000]
        status = "FAILED" if incomplete else status
        log.error("run %s could not log to %s: %s; it ends %s", run_id, tracking_uri(),
                  missing[:2000], status)
    # the outbox already waited out the retry time if the server is still away
    wait_s = KILLED_RETRY_S if box.metrics or box.files else retry_s()
    try:
        for key, value in tags.items():
            retry_while_unreachable("tagging the run", functools.partial(
                client.set_tag, run_id, key, value), wait_s)
        # not mlflow.end_run: it pops the run first, so a retry would end the parent run
        retry_while_unreachable("ending the run", functools.partial(
            client.set_terminated, run_id, status), wait_s)
    except Exception as exc:
        with contextlib.suppress(Exception):  # off MLflow's run stack; the server cannot hear
            mlflow.end_run(status=status)
        raise AtariVaeError(
            f"the tracking server at {tracking_uri()} stayed unreachable, so MLflow run {run_id} "
            f"could not be ended {status} (it shows RUNNING) and these were not logged: "
            f"{missing or 'nothing'}; the outputs on disk are complete") from exc
    with contextlib.suppress(Exception):  # the status is stored; this pops MLflow's run stack
        mlflow.end_run(status=status)
    if incomplete:  # never a silent FINISHED with holes
        raise AtariVaeError(f"MLflow run {run_id} could not log {missing[:500]}; it is marked "
                            f"FAILED (tag 'unlogged'); the outputs on disk are complete")


def log_config(cfg: Any) -> None:
    """Log every flag of a job config as a param (not the fields it hides, such as tune's
    latent_dim), skipping those ``mlflow run`` already logged."""
    import mlflow

    from atari_vae.config import fields_of

    run_id = mlflow.active_run().info.run_id
    existing = retrying("reading the run", lambda: mlflow.get_run(run_id).data.params)
    log_params({f.name: getattr(cfg, f.name) for f in fields_of(type(cfg))
                if f.name not in existing})


def log_metrics(metrics: dict[str, float], step: int | None = None,
                model_id: str | None = None, per_epoch: bool = False) -> None:
    """Log metrics to the active run under their UI names (``metric_key``), linked to the
    logged model ``model_id`` if given; never raises while the tracking server is away.

    A local store is written at once; a server gets them from a background thread, so a slow
    or restarting server never stalls training.
    """
    import mlflow
    from mlflow.entities import Metric

    run_id = mlflow.active_run().info.run_id
    now = int(time.time() * 1000)
    points = [Metric(metric_key(k, per_epoch, of_model=model_id is not None), float(v), now,
                     step or 0, model_id=model_id, run_id=run_id) for k, v in metrics.items()]
    OUTBOX.put(run_id, points, background=_is_remote())


def log_params(params: dict[str, Any]) -> None:
    """Log params to the active run (values as MLflow stores them: strings)."""
    import mlflow

    values = {k: "" if v is None else v for k, v in params.items()}
    retrying("logging params", lambda: mlflow.log_params(values))


def set_tags(tags: dict[str, Any]) -> None:
    """Set tags on the active run; unlike params they may be overwritten."""
    import mlflow

    values = {k: str(v) for k, v in tags.items()}
    retrying("setting tags", lambda: mlflow.set_tags(values))


def set_version_tags(client: Any, name: str, version: str, tags: dict[str, str]) -> None:
    """Set tags on a registered model version, also when another writer sets the same new tag
    at the same moment (PostgreSQL then raises a duplicate key: setting again updates the row)."""
    from mlflow.exceptions import MlflowException

    for key, value in tags.items():
        try:
            client.set_model_version_tag(name, version, key, value)
        except MlflowException as exc:
            if "duplicate key" not in str(exc) and "UNIQUE constraint" not in str(exc):
                raise
            client.set_model_version_tag(name, version, key, value)


def run_exists(run_id: str) -> bool:
    """True when the tracking store holds ``run_id`` as a run that can be continued."""
    import mlflow

    try:
        return mlflow.MlflowClient().get_run(run_id).info.lifecycle_stage == "active"
    except mlflow.exceptions.MlflowException:  # another store, or the run was purged
        return False


def mark_killed(run_id: str) -> None:
    """End a run left RUNNING by a killed worker (and its parent) as KILLED."""
    import mlflow

    client = mlflow.MlflowClient()
    with contextlib.suppress(Exception):  # best effort: the run may be gone or already ended
        run = client.get_run(run_id)
        for rid in (run_id, run.data.tags.get("mlflow.parentRunId")):
            if rid and client.get_run(rid).info.status == "RUNNING":
                client.set_terminated(rid, "KILLED")
                log.info("marked MLflow run %s of a killed worker KILLED", rid)


def log_files(paths: list[Path], artifact_path: str | None = None) -> None:
    """Copy files into the active run's artifacts (PNGs show as images in the UI); to a server
    they are uploaded in the background and retried, like metrics."""
    import mlflow

    if not _is_remote():  # a local copy: errors such as a full disk surface at once
        for path in paths:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)
        return
    OUTBOX.put(active_run_id(), [], [(str(p), artifact_path) for p in paths], background=True)


class MlflowTrainHooks:
    """TrainHooks that log per-epoch metrics and checkpoint images to the active run."""

    def on_epoch_end(self, epoch: int, stats: dict[str, float]) -> None:
        log_metrics({k: v for k, v in stats.items() if k != "epoch"}, step=epoch, per_epoch=True)

    def on_checkpoint(self, epoch: int, files: list[Path]) -> None:
        log_files([f for f in files if f.suffix == ".png"], "reconstructions")


class MlflowPlanHooks:
    """PlanHooks logging each CMA-ES generation's scores as ``<prefix><name>`` at its step."""

    def __init__(self, prefix: str = "plan/") -> None:
        self.prefix = prefix

    def on_generation(self, generation: int, stats: dict[str, float]) -> None:
        log_metrics({f"{self.prefix}{k}": v for k, v in stats.items()}, step=generation)


def active_run_id() -> str | None:
    """The id of the active run, if any."""
    import mlflow

    run = mlflow.active_run()
    return run.info.run_id if run else None
