"""The Optuna study of a tune job: its storage (checked before any work), the study itself,
and which trial it picks.

Storage: ``--storage``, else ``sqlite:///optuna.db`` beside a SQLite ``mlflow.db``; never the
MLflow store itself (both keep an ``alembic_version`` table, and Optuna would add its tables
to MLflow's database before refusing it).
"""

from __future__ import annotations

import logging
import sqlite3
import time
import warnings
from pathlib import Path
from typing import Any

import optuna

from atari_vae import tracking
from atari_vae.config import TuneConfig
from atari_vae.errors import ConfigError

log = logging.getLogger(__name__)
CONSTRAINT = "kl_over_budget"
STORAGE_FILE = "optuna.db"
SAMPLER_STARTUP_TRIALS = 8
PRUNER_STARTUP_TRIALS = 3
STORAGE_ATTEMPTS = 3
MLFLOW_TABLES = {"experiments", "runs", "registered_models", "model_versions"}
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def resolve_storage(storage: str) -> str:
    """The Optuna storage URL: ``storage``, else sqlite optuna.db beside a SQLite mlflow.db."""
    if storage:
        return storage
    uri = tracking.tracking_uri()
    folder = Path(uri[len("sqlite:///"):]).parent if uri.startswith("sqlite:///") else Path()
    return f"sqlite:///{(folder / STORAGE_FILE).resolve()}"


def display_url(url: str) -> str:
    """``url`` with any password masked, for logs, tags and messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL: the message names it as given
        return url


def check_not_mlflow_store(url: str) -> None:
    """A ConfigError if ``url`` is the MLflow tracking store or a SQLite file holding one;
    looks without writing anything."""
    if _same_database(url, tracking.tracking_uri()) or _sqlite_tables(url) >= MLFLOW_TABLES:
        raise ConfigError(
            f"--storage {display_url(url)!r} is an MLflow store; give Optuna its own database, "
            f"e.g. sqlite:///{STORAGE_FILE} or postgresql://user@host:5432/optuna")


def _same_database(a: str, b: str) -> bool:
    try:
        from sqlalchemy.engine import make_url

        ua, ub = make_url(a), make_url(b)
    except Exception:  # not both SQLAlchemy URLs (e.g. an http:// tracking server)
        return False
    if ua.get_backend_name() != ub.get_backend_name():
        return False
    if ua.get_backend_name() == "sqlite":
        return bool(ua.database) and bool(ub.database) and \
            Path(ua.database).resolve() == Path(ub.database).resolve()
    return (ua.host, ua.port, ua.database) == (ub.host, ub.port, ub.database)


def _sqlite_tables(url: str) -> set[str]:
    """The tables of an existing SQLite file named by ``url``, opened read-only; else none."""
    if not url.startswith("sqlite:///"):
        return set()
    path = Path(url[len("sqlite:///"):].split("?")[0])
    if not path.is_file():
        return set()
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            rows = conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    except sqlite3.Error:  # not a database: Optuna's own error says so later
        return set()
    return {r[0] for r in rows}


def open_storage(url: str, heartbeat_interval: int) -> optuna.storages.BaseStorage:
    """An RDB storage with heartbeats, so a killed worker's trial turns FAIL and is retried once."""
    check_not_mlflow_store(url)
    url = with_installed_driver(url)
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}  # workers wait for SQLite's write lock
    elif url.startswith("postgresql"):
        kwargs["connect_args"] = {"connect_timeout": 10}
    last: Exception | None = None
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_interval,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=1))
        except Exception as exc:  # bad URL, missing driver, server down, schema-creation race
            last = exc
            if "already exists" not in str(exc):
                break
            time.sleep(1.0 + attempt)
    first = str(last).strip().splitlines()[0][:200] if str(last).strip() else type(last).__name__
    hint = " (pip install psycopg2-binary)" if isinstance(last, ImportError) else ""
    raise ConfigError(
        f"--storage {display_url(url)!r} cannot be opened ({first}){hint}; give an Optuna "
        f"storage URL such as sqlite:///optuna.db or postgresql://user@host:5432/db")


def with_installed_driver(url: str) -> str:
    """postgresql:// with psycopg2 when psycopg 3 (SQLAlchemy 2.1's default driver) is absent."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def open_study(cfg: TuneConfig, url: str) -> optuna.Study:
    """Create or join the study: workers with the same storage and name share it."""
    storage = open_storage(url, cfg.heartbeat_interval)
    # Unseeded sampler: parallel workers started together must not propose the same points.
    sampler = optuna.samplers.TPESampler(n_startup_trials=SAMPLER_STARTUP_TRIALS,
                                         constant_liar=True)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS,
                                         n_warmup_steps=max(1, cfg.epochs // 3))
    try:
        return optuna.create_study(storage=storage, study_name=cfg.study_name,
                                   direction="maximize", sampler=sampler, pruner=pruner,
                                   load_if_exists=True)
    except ValueError as exc:  # e.g. an existing study of the same name with other directions
        raise ConfigError(f"--study_name {cfg.study_name!r}: {exc}") from exc


def best_feasible_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The complete trial with the highest value among those within the rate budget."""
    feasible = [t for t in study.get_trials(deepcopy=False,
                                            states=(optuna.trial.TrialState.COMPLETE,))
                if t.value is not None and all(v <= 0 for v in t.constraints.values())
                and CONSTRAINT in t.constraints]
    return max(feasible, key=lambda t: t.value) if feasible else None


def no_feasible_message(study: optuna.Study, cfg: TuneConfig) -> str:
    """Why nothing was registered, with what would help."""
    trials = study.get_trials(deepcopy=False)
    counts = {s.name: sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
    kls = [t.user_attrs["kl"] for t in trials if "kl" in t.user_attrs]
    detail = (f"lowest held-out KL {min(kls):.1f} nats/frame is over --kl_budget "
              f"{cfg.kl_budget}; raise it or --kl_weight_min" if kls else
              "no trial completed; see the log above for why trials failed or were pruned")
    return (f"study {cfg.study_name!r} has no feasible complete trial to register "
            f"({counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} "
            f"failed): {detail}")
