"""Registry: the champion alias moves only to a better model, also under racing writers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from atari_vae import champion, registry, tracking
from atari_vae.data import load_or_collect
from atari_vae.envs import FRAME_SHAPE, resolve_game
from atari_vae.errors import AtariVaeError
from atari_vae.metrics import reference_frames
from atari_vae.model import VAE
from tests.conftest import REPO

EVAL_SAMPLES = 64
BREAKOUT = resolve_game("Breakout")


def untrained_vae(good: bool) -> VAE:
    """An untrained VAE whose output starts at the game's background (good) or its negative."""
    torch.manual_seed(0)
    model = VAE(FRAME_SHAPE, latent_dim=8)
    _, background = reference_frames(load_or_collect(BREAKOUT, 3, 60, 42, False).frames_uint8)
    model.init_output_bias(background if good else 1.0 - background)
    return model.eval()


def log_model(good: bool) -> tuple[str, str]:
    """(model_uri, run_id) of a run that logged a good or a bad model."""
    tracking.configure("atari-vae")
    with tracking.tracked_run("good" if good else "bad") as run:
        info = registry.log_vae_model(untrained_vae(good), {"game": "Breakout"})
    return info.model_uri, run.info.run_id


def register(good: bool, name: str) -> registry.ChampionDecision:
    uri, run_id = log_model(good)
    return champion.register_candidate(uri, run_id, name, [BREAKOUT], EVAL_SAMPLES,
                                   {"quality": "good" if good else "bad"}, "test model")


def champion_of(name: str) -> str:
    return str(mlflow.MlflowClient().get_model_version_by_alias(name, "champion").version)


@pytest.mark.slow
def test_champion_moves_only_to_a_model_that_beats_it_on_the_held_out_frames() -> None:
    first = register(good=False, name="m")
    assert first.moved and first.reason == "no champion yet"
    better = register(good=True, name="m")
    assert better.moved and "beats champion version 1" in better.reason
    worse = register(good=False, name="m")
    assert not worse.moved and "does not beat champion version 2" in worse.reason
    assert champion_of("m") == better.version == "2"
    client = mlflow.MlflowClient()
    kept = client.get_model_version("m", worse.version)
    assert kept.aliases == [] and "does not beat" in kept.tags["champion_decision"]
    assert float(kept.tags[registry.SCORE_TAG]) < float(
        client.get_model_version("m", "2").tags[registry.SCORE_TAG])
    # Registering the same run again reuses its version instead of adding one.
    assert registry.register_version(f"runs:/{kept.run_id}/breakout", "m", kept.run_id, {}, "") \
        == worse.version


@pytest.mark.slow
def test_recheck_moves_champion_back_to_the_best_scored_version_after_a_lost_race() -> None:
    register(good=True, name="m")
    worse = register(good=False, name="m")
    key = mlflow.MlflowClient().get_model_version("m", "1").tags[registry.EVAL_TAG]
    # A remote store has no lock: a slower writer may leave the alias on the worse version.
    mlflow.MlflowClient().set_registered_model_alias("m", "champion", worse.version)
    assert registry.settle_champion("m", key) == "1"
    assert champion_of("m") == "1"


def _race_worker(good: bool, name: str, ready_dir: str) -> None:
    """Run in a subprocess: log a model, wait for the rival, then register at the same time."""
    uri, run_id = log_model(good)
    Path(ready_dir, f"{good}").touch()
    while len(list(Path(ready_dir).iterdir())) < 2:
        time.sleep(0.05)
    decision = champion.register_candidate(uri, run_id, name, [BREAKOUT], EVAL_SAMPLES, {}, "race")
    print("DECISION", decision.version, decision.moved, flush=True)


@pytest.mark.slow
def test_two_registrations_finishing_at_once_leave_champion_on_the_better_model(
        tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    ready.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(
        [sys.executable, "-c", f"from tests.test_registry import _race_worker; "
                               f"_race_worker({good}, 'race', {str(ready)!r})"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for good in (False, True)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-2000:]
    client = mlflow.MlflowClient()
    versions = {client.get_run(v.run_id).info.run_name: str(v.version)
                for v in client.search_model_versions("name='race'")}
    assert sorted(versions) == ["bad", "good"]  # runs are named after their model's quality
    assert champion_of("race") == versions["good"]


def test_registered_model_serves_latent_means_through_pyfunc() -> None:
    register(good=True, name="served")
    frames = np.random.default_rng(0).random((3, *FRAME_SHAPE), dtype=np.float32)
    served = mlflow.pyfunc.load_model("models:/served@champion").predict(frames)
    vae = registry.load_registered("served")
    assert not vae.training
    with torch.no_grad():
        mu, _ = vae.encode(torch.from_numpy(frames))
    assert served.shape == (3, 8)
    np.testing.assert_allclose(served, mu.numpy(), rtol=1e-5, atol=1e-6)


def test_missing_registered_name_or_alias_is_a_clear_error() -> None:
    register(good=True, name="present")
    with pytest.raises(AtariVaeError, match="cannot load models:/absent@champion"):
        registry.load_registered("absent")
    with pytest.raises(AtariVaeError, match="models:/present@nope"):
        registry.load_registered("present", alias="nope")


def test_logging_a_model_raises_no_mlflow_warning_about_predict_type_hints() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log_model(good=True)
    assert not [w for w in caught if "type hint" in str(w.message).lower()]
