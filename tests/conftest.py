"""Shared fixtures: a real temporary SQLite MLflow store, a shared frame cache, tiny configs."""

from __future__ import annotations

import contextlib
import os
import random
import socket
from pathlib import Path

import pytest

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
# Tiny batches gain little from threads, and on a shared 2-core machine two spinning OpenMP
# pools make a tiny training 10-30x slower; subprocesses inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
# Servers under test listen here: below the ephemeral range (32768-60999 on Linux).
PORTS_FROM, PORTS_PER_WORKER = 20000, 1000


def shared_tmp(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A directory for the whole test session: under pytest-xdist, one for all its workers."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's basetemp is a child of the run's
        base = base.parent
    path = base / name
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def frame_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One frame cache for the whole session, so each tiny data set is collected once (the
    cache's own per-key lock lets workers share it)."""
    return shared_tmp(tmp_path_factory, "frame-cache")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, frame_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own cwd and SQLite MLflow store, with no active experiment left from
    another test; the frame cache is shared."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ATARI_VAE_CACHE_DIR", str(frame_cache))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    import mlflow
    from mlflow.tracking import fluent

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    # mlflow.set_experiment keeps the experiment id in a module global: an id from another
    # test's store sent a later bare start_run to an experiment the team server never had.
    monkeypatch.setattr(fluent, "_active_experiment_id", None)
    yield tmp_path
    while mlflow.active_run():
        mlflow.end_run()


def free_port() -> int:
    """A free loopback TCP port below the kernel's ephemeral range (so no outgoing connection
    takes it), from a block of its own for each xdist worker (so no two workers pick one)."""
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    first = PORTS_FROM + index * PORTS_PER_WORKER
    block = range(first, first + PORTS_PER_WORKER)
    for port in random.sample(block, len(block)):
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", port))
            return port
    raise RuntimeError(f"no free port in {block.start}-{block.stop - 1}")


def same_frames(a, b) -> bool:
    """Two FrameSets hold the same frames, episode ids, steps, game ids and games."""
    import dataclasses

    import torch

    from atari_vae.data import FrameSet
    from atari_vae.store import FrameRows

    def tensor(values):
        return values[:] if isinstance(values, FrameRows) else values

    return all(torch.equal(tensor(getattr(a, f.name)), tensor(getattr(b, f.name)))
               for f in dataclasses.fields(FrameSet) if f.name != "games") and a.games == b.games


def tiny_train_flags(output_dir: Path | str, **overrides: object) -> dict[str, object]:
    """TrainConfig kwargs for a real but seconds-long run: 3 short Breakout episodes, 2 epochs."""
    flags = dict(env_name="Breakout", num_episodes=3, max_steps=60, epochs=2, batch_size=32,
                 latent_dim=8, checkpoint_freq=1, output_dir=str(output_dir), device="cpu")
    flags.update(overrides)
    return flags


def tiny_fit(output_dir: Path, **overrides: object):
    """``train.fit`` on ``tiny_train_flags`` (no MLflow): its ``TrainResult``."""
    from atari_vae.config import TrainConfig
    from atari_vae.data import load_games, split_by_episode
    from atari_vae.envs import parse_games
    from atari_vae.train import fit

    cfg = TrainConfig(**tiny_train_flags(output_dir, **overrides))
    frames = load_games(parse_games(cfg.env_name), cfg.num_episodes, cfg.max_steps, cfg.seed,
                        progress=False)
    return fit(cfg, *split_by_episode(frames, cfg.val_split, cfg.seed))


# The quick test's data and epochs (latent 8) on the 32-256 wide net, which learns more an
# epoch than the default 16-128: the model learns the paddle and the score and clears the
# quality floor on the selection frames (+0.86 dB, +0.35 fg accuracy on 64 frames).
GOOD_TRAINING = dict(num_episodes=5, max_steps=1000, epochs=10, batch_size=32, latent_dim=8,
                     base_channels=32)


@pytest.fixture(scope="session")
def good_model_file(tmp_path_factory: pytest.TempPathFactory, frame_cache: Path) -> Path:
    """best_model.pt of a real training (no MLflow) that beats the mean frame by more than the
    quality floor on the selection frames; trained once per session, whatever the workers."""
    from filelock import FileLock

    from atari_vae.config import TrainConfig
    from atari_vae.data import load_or_collect, split_by_episode
    from atari_vae.envs import resolve_game
    from atari_vae.train import fit

    out = shared_tmp(tmp_path_factory, "good-model")
    with FileLock(str(out / ".lock")), pytest.MonkeyPatch.context() as env:
        if not (out / "trained").exists():  # another xdist worker trained it already
            env.setenv("ATARI_VAE_CACHE_DIR", str(frame_cache))
            cfg = TrainConfig(**tiny_train_flags(out, checkpoint_freq=1000, **GOOD_TRAINING))
            frames = load_or_collect(resolve_game(cfg.env_name), cfg.num_episodes,
                                     cfg.max_steps, cfg.seed, False)
            fit(cfg, *split_by_episode(frames, cfg.val_split, cfg.seed))
            (out / "trained").touch()
    return out / "best_model.pt"


@pytest.fixture
def champion_vae():
    """A small untrained VAE (latent 8) logged to the test's store and registered as
    atari-vae-breakout@champion."""
    import mlflow
    import torch

    from atari_vae import registry, tracking
    from atari_vae.model import VAE

    torch.manual_seed(0)
    vae = VAE((3, 64, 64), 8).eval()
    tracking.configure("vae")
    with tracking.tracked_run("log-vae"):
        info = registry.log_vae_model(vae, {"game": "Breakout"})
    version = mlflow.register_model(info.model_uri, "atari-vae-breakout").version
    mlflow.MlflowClient().set_registered_model_alias("atari-vae-breakout", "champion", version)
    return vae
