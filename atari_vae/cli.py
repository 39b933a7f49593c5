"""The ``atari-vae`` command: options generated from the config dataclasses, errors as one line."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click

from atari_vae.config import (
    EvaluateConfig,
    PlanConfig,
    RegisterConfig,
    ServeConfig,
    TrainConfig,
    TuneConfig,
    fields_of,
)
from atari_vae.errors import AtariVaeError, interrupted

_CLICK_TYPES = {int: click.INT, float: click.FLOAT, str: click.STRING}
# A full disk or quota, a file over the size limit, a read-only file system: the user's to fix.
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def _option(f: dataclasses.Field) -> Callable:
    meta, names = f.metadata, [f"--{f.name}"]
    if "_" in f.name:
        names.append(f"--{f.name.replace('_', '-')}")
    if isinstance(f.default, bool):
        return click.option(*names, is_flag=True, default=f.default, help=meta["help"])
    kind = (click.Choice(meta["choices"]) if meta["choices"] and f.name != "device"
            else _CLICK_TYPES[type(f.default)])
    return click.option(*names, type=kind, default=f.default, show_default=True,
                        help=meta["help"])


def options_from(config_cls: type) -> Callable:
    """Decorate a click command with one option per field of ``config_cls``."""
    def decorate(func: Callable) -> Callable:
        for f in reversed(fields_of(config_cls)):
            func = _option(f)(func)
        return func
    return decorate


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    for noisy in ("alembic", "mlflow", "urllib3", "matplotlib", "PIL", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt while a command runs (so a killed job ends
    KILLED in MLflow); the caller's handlers come back after it."""
    signums = [getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]  # Windows
    saved = {signum: signal.signal(signum, _interrupted) for signum in signums}  # has no SIGHUP
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def friendly_errors(func: Callable) -> Callable:
    """Turn user-fixable errors into one line on stderr and exit 1, never a traceback."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        if not logging.getLogger().handlers:  # scripts call the command without the group
            _setup_logging(verbose=False)
        with _signals_interrupt():
            return _one_line_errors(func, *args, **kwargs)
    return wrapper


def _one_line_errors(func: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call ``func``; a user-fixable error or an interrupt becomes one line and an exit code."""
    try:
        return func(*args, **kwargs)
    except AtariVaeError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        if exc.errno not in _STORAGE_ERRNOS:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        click.echo(f"Error: could not write{where}: {exc.strerror or exc}; free some space "
                   f"or choose another --output_dir (the MLflow run is marked FAILED)",
                   err=True)
        sys.exit(1)
    except BaseException as exc:
        if not interrupted(exc):
            raise
        click.echo("Interrupted; the MLflow run is marked KILLED. Resume with --resume.",
                   err=True)
        sys.exit(130)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Variational autoencoders for 64x64 Atari frames, tracked in MLflow."""
    _setup_logging(verbose)


@main.command()
@options_from(TrainConfig)
@friendly_errors
def train(**flags: Any) -> None:
    """Collect random-policy frames and train a VAE (see README for the loss)."""
    from atari_vae.jobs import train_job

    train_job(TrainConfig(**flags))


@main.command()
@options_from(EvaluateConfig)
@friendly_errors
def evaluate(**flags: Any) -> None:
    """Score a model on fresh episodes against the mean-frame baseline."""
    from atari_vae.evaluate import evaluate_job

    evaluate_job(EvaluateConfig(**flags))


@main.command()
@options_from(TuneConfig)
@friendly_errors
def tune(**flags: Any) -> None:
    """Optuna study over kl_weight and latent_dim; registers the best model (champion only
    if it passes the quality floor)."""
    from atari_vae.tune import tune_job

    tune_job(TuneConfig(**flags))


@main.command()
@options_from(RegisterConfig)
@friendly_errors
def register(**flags: Any) -> None:
    """Register a trained model; it becomes champion only if it passes the quality floor and
    beats the current champion on the selection frames."""
    from atari_vae.registration import register_job

    register_job(RegisterConfig(**flags))


@main.command()
@options_from(ServeConfig)
@friendly_errors
def serve(**flags: Any) -> None:
    """Serve latent means over HTTP from the installed package (request size limits)."""
    from atari_vae.serve import serve_job

    serve_job(ServeConfig(**flags))


@main.command()
@options_from(PlanConfig)
@friendly_errors
def plan(**flags: Any) -> None:
    """Train a linear controller on the champion VAE's z with CMA-ES on game score; test it
    against the random policy and a random-encoder control; register <model_name>-controller."""
    from atari_vae.plan_job import plan_job

    result = plan_job(PlanConfig(**flags))  # logs the score table
    click.echo(f"registered {result.controller_name} version {result.controller_version}: "
               f"{result.champion_decision}")


if __name__ == "__main__":
    main()
