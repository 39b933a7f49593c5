"""Promotion: the quality floor, the champion comparison on selection frames, broken champions,
an unreachable registry, racing registrations. Real MLflow, really trained models."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from atari_vae import promotion, registration, registry, registry_retry, tracking
from atari_vae.config import (
    FLOOR_FG_ACCURACY_MARGIN,
    FLOOR_PSNR_MARGIN_DB,
    SELECTION_SEED,
    EvaluateConfig,
)
from atari_vae.data import load_or_collect
from atari_vae.envs import FRAME_SHAPE, resolve_game
from atari_vae.evaluate import REFERENCE_SEED_OFFSET
from atari_vae.metrics import reference_frames
from atari_vae.model import VAE
from tests.conftest import REPO

EVAL_SAMPLES = 64
BREAKOUT = resolve_game("Breakout")
def good_model(path: Path) -> VAE:
    return registry.load_state_file(path)


def worse_good_model(path: Path) -> VAE:
    """The good model with seeded noise on its decoder's output layer: still above the floor,
    below the good model."""
    model = good_model(path)
    last = [p for n, p in model.named_parameters() if n.startswith("decoder")][-2]
    with torch.no_grad():
        last.add_(0.03 * torch.randn(last.shape, generator=torch.Generator().manual_seed(0)))
    return model


def background_model() -> VAE:
    """An untrained VAE that outputs the game's static background: it misses every object."""
    torch.manual_seed(0)
    model = VAE(FRAME_SHAPE, latent_dim=8)
    _, background = reference_frames(load_or_collect(BREAKOUT, 3, 60, 42, False).frames_uint8)
    model.init_output_bias(background)
    return model.eval()


def log_model(model: VAE, run_name: str, **metadata: object) -> tuple[str, str]:
    """(model_uri, run_id) of a real run that logged ``model``."""
    tracking.configure("atari-vae")
    with tracking.tracked_run(run_name) as run:
        info = registry.log_vae_model(model, {"game": "Breakout", **metadata})
    return info.model_uri, run.info.run_id


def register(model: VAE, name: str, run_name: str = "m") -> promotion.ChampionDecision:
    uri, run_id = log_model(model, run_name)
    return registration.register_and_promote(uri, run_id, name, [BREAKOUT], EVAL_SAMPLES, {},
                                             "test model")


def register_as_champion_by_hand(model: VAE, name: str, **metadata: object) -> str:
    """A version registered for real and given the alias directly (as an old or hand-made one)."""
    uri, run_id = log_model(model, "by-hand", **metadata)
    version = registration.register_version(uri, name, run_id, {}, "by hand")
    client = mlflow.MlflowClient()
    client.set_model_version_tag(name, version, promotion.STATE_TAG, "done")
    client.set_registered_model_alias(name, promotion.CHAMPION, version)
    return version


def champion_of(name: str) -> str | None:
    return promotion.champion_version(name)


def tags_of(name: str, version: str) -> dict[str, str]:
    return mlflow.MlflowClient().get_model_version(name, version).tags


# --- point 1: the quality floor -------------------------------------------------------------------

def test_floor_failure_names_the_game_and_the_margin_it_misses() -> None:
    base = {"baseline_psnr": 32.0, "baseline_fg_accuracy": 0.2}
    passing = {**base, "psnr": 32.0 + FLOOR_PSNR_MARGIN_DB + 1e-9, "fg_accuracy":
               0.2 + FLOOR_FG_ACCURACY_MARGIN + 1e-9}
    assert promotion.floor_failure({"Breakout": passing}) is None
    low_psnr = promotion.floor_failure({"Breakout": {**passing, "psnr": 32.2}})
    assert low_psnr.startswith("Breakout: PSNR 32.20 dB is not")
    low_fg = promotion.floor_failure({"Breakout": passing, "Pong": {**passing,
                                                                   "fg_accuracy": 0.25}})
    assert low_fg == (f"Pong: fg_accuracy 0.250 is not {FLOOR_FG_ACCURACY_MARGIN:g} above the "
                      f"mean frame's 0.200")
    both = promotion.floor_failure({"Breakout": {**passing, "psnr": 30.0, "fg_accuracy": 0.0}})
    assert both.startswith("Breakout: PSNR 30.00 dB") and ", and Breakout: fg_accuracy" in both
    assert promotion.floor_failure({"Breakout": {**passing, "fg_accuracy": float("nan")}})


def test_first_version_below_the_floor_is_registered_without_the_alias_and_says_why() -> None:
    decision = register(background_model(), "m")
    assert not decision.moved and decision.champion is None and champion_of("m") is None
    # an untrained model scores below the mean frame on all pixels and on the objects
    assert "below the quality floor (Breakout: PSNR" in decision.reason
    assert ", and Breakout: fg_accuracy " in decision.reason
    assert decision.reason.endswith("no champion is set")
    tags = tags_of("m", decision.version)
    assert tags[promotion.FLOOR_TAG].startswith("failed: Breakout: PSNR")
    assert tags[promotion.DECISION_TAG] == decision.reason
    # it still never becomes champion when the alias is settled later
    assert promotion.settle_champion("m", tags[promotion.EVAL_TAG]) is None


@pytest.mark.slow
def test_a_trained_model_above_the_floor_becomes_champion_and_a_better_one_replaces_it(
        good_model_file: Path) -> None:
    first = register(worse_good_model(good_model_file), "m")
    assert first.moved and first.reason.startswith("no champion yet"), first.reason
    assert tags_of("m", "1")[promotion.FLOOR_TAG] == promotion.PASSED
    better = register(good_model(good_model_file), "m")
    assert better.moved and "beats champion version 1" in better.reason
    worse = register(worse_good_model(good_model_file), "m", run_name="again")
    assert not worse.moved and "does not beat champion version 2" in worse.reason
    assert champion_of("m") == "2"
    assert float(tags_of("m", "3")[promotion.SCORE_TAG]) < float(
        tags_of("m", "2")[promotion.SCORE_TAG])


# --- point 2: faults never promote, broken champions never block --------------------------------

def test_settle_champion_ignores_non_finite_scores() -> None:
    decision = register(background_model(), "m")
    key = tags_of("m", decision.version)[promotion.EVAL_TAG]
    other = register_as_champion_by_hand(background_model(), "m")
    client = mlflow.MlflowClient()
    for version, score in ((decision.version, "1.0"), (other, "inf")):
        for tag, value in ((promotion.EVAL_TAG, key), (promotion.FLOOR_TAG, promotion.PASSED),
                           (promotion.SCORE_TAG, score)):
            client.set_model_version_tag("m", version, tag, value)
    assert promotion.settle_champion("m", key) == decision.version
    client.set_model_version_tag("m", decision.version, promotion.SCORE_TAG, "nan")
    assert promotion.valid_score(tags_of("m", decision.version), key) is None
    assert promotion.settle_champion("m", key) == decision.version  # nothing valid: no move


@pytest.mark.slow
@pytest.mark.parametrize("broken", ["wrong_shape", "nan_weights"])
def test_broken_champion_is_demoted_with_a_reason_and_a_good_newcomer_takes_the_alias(
        broken: str, good_model_file: Path) -> None:
    if broken == "wrong_shape":  # config.json says 16 latent dims, the weights have 8
        old = register_as_champion_by_hand(background_model(), "m", latent_dim=16)
        why = "it does not load (RuntimeError"
    else:
        model = background_model()
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        old = register_as_champion_by_hand(model, "m")
        why = "its weights are not finite"
    decision = register(good_model(good_model_file), "m")
    assert decision.moved and champion_of("m") == decision.version
    assert f"champion version {old} was demoted ({why}" in decision.reason
    assert tags_of("m", old)[promotion.DEMOTED_TAG].startswith(why)
    assert promotion.SCORE_TAG not in tags_of("m", old)


def test_unreachable_registry_aborts_the_promotion_and_stores_no_score(
        monkeypatch: pytest.MonkeyPatch) -> None:
    champion = register_as_champion_by_hand(background_model(), "m")
    uri, run_id = log_model(background_model(), "newcomer")
    newcomer = registration.register_version(uri, "m", run_id, {}, "newcomer")
    store = mlflow.get_tracking_uri()
    monkeypatch.setattr(registry_retry, "FETCH_BACKOFF_S", 0.1)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    closed = "http://127.0.0.1:1"  # nothing listens on port 1: every request is refused
    monkeypatch.setenv("MLFLOW_TRACKING_URI", closed)
    mlflow.set_tracking_uri(closed)
    try:
        with pytest.raises(registry_retry.PromotionAborted,
                           match=r"cannot read the champion of 'm' from http://127.0.0.1:1 "
                                 r"after 3 tries .*champion alias is unchanged"):
            promotion.champion_version("m")
        with pytest.raises(registry_retry.PromotionAborted, match="aborted"):
            promotion.promote_version("m", newcomer, [BREAKOUT], EVAL_SAMPLES)
    finally:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
        mlflow.set_tracking_uri(store)
    assert champion_of("m") == champion
    for version in (champion, newcomer):
        assert promotion.SCORE_TAG not in tags_of("m", version)
        assert promotion.DEMOTED_TAG not in tags_of("m", version)


# --- point 3: selection frames are not evaluation frames ------------------------------------------

def test_selection_frames_come_from_their_own_episodes_not_evaluates() -> None:
    scorer = promotion.SelectionScorer([BREAKOUT], 1000)
    evaluate = EvaluateConfig()
    assert scorer.eval_cfg.seed == SELECTION_SEED != evaluate.seed
    assert f"seed={SELECTION_SEED}" in scorer.key
    # ALE seeds episode i with seed + i: the four episode ranges (scored and reference frames
    # of each) must not meet for any sample count up to 5000 (100 episodes).
    starts = sorted([SELECTION_SEED, SELECTION_SEED + REFERENCE_SEED_OFFSET, evaluate.seed,
                     evaluate.seed + REFERENCE_SEED_OFFSET])
    assert all(b - a >= 100 for a, b in zip(starts, starts[1:]))


def test_scores_on_other_frames_never_share_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from atari_vae import evaluate

    keys = {promotion.SelectionScorer([BREAKOUT], 1000).key,
            promotion.SelectionScorer([BREAKOUT], 999).key}
    monkeypatch.setattr(promotion, "COLLECTOR_VERSION", promotion.COLLECTOR_VERSION + 1)
    keys.add(promotion.SelectionScorer([BREAKOUT], 1000).key)
    monkeypatch.setattr(evaluate, "SCORED_FRAMES_PER_EPISODE", 7)
    keys.add(promotion.SelectionScorer([BREAKOUT], 1000).key)
    assert len(keys) == 4


# --- racing registrations -------------------------------------------------------------------------

def _race_worker(quality: str, model_file: str, name: str, ready_dir: str) -> None:
    """Run in a subprocess: log a model, wait for the rival, then register at the same time."""
    models = {"good": good_model, "worse": worse_good_model}
    model = models[quality](Path(model_file)) if quality in models else background_model()
    uri, run_id = log_model(model, quality)
    Path(ready_dir, quality).touch()
    while len(list(Path(ready_dir).iterdir())) < 2:
        time.sleep(0.05)
    decision = registration.register_and_promote(uri, run_id, name, [BREAKOUT], EVAL_SAMPLES,
                                                 {}, "race")
    print("DECISION", decision.version, decision.moved, flush=True)


def _race(tmp_path: Path, model_file: Path, name: str, qualities: tuple[str, str]) -> set:
    """Start two registrations at once; the set of versions seen holding the alias meanwhile."""
    ready = tmp_path / f"ready-{name}"
    ready.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen(
        [sys.executable, "-c", f"from tests.test_promotion import _race_worker; "
                               f"_race_worker({q!r}, {str(model_file)!r}, {name!r}, "
                               f"{str(ready)!r})"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for q in qualities]
    seen = set()
    while any(p.poll() is None for p in procs):
        seen.add(champion_of(name))
        time.sleep(0.05)
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
    seen.add(champion_of(name))
    return seen


def _versions_by_run_name(name: str) -> dict[str, str]:
    client = mlflow.MlflowClient()
    return {client.get_run(v.run_id).info.run_name: str(v.version)
            for v in client.search_model_versions(f"name='{name}'")}


@pytest.mark.slow
def test_two_registrations_at_once_leave_the_better_and_never_show_the_worse(
        tmp_path: Path, good_model_file: Path) -> None:
    seen = _race(tmp_path, good_model_file, "race", ("worse", "good"))
    versions = _versions_by_run_name("race")
    assert sorted(versions) == ["good", "worse"]
    assert champion_of("race") == versions["good"]
    assert versions["worse"] not in seen, seen


@pytest.mark.slow
def test_race_over_a_broken_champion_demotes_it_and_a_below_floor_rival_never_holds_the_alias(
        tmp_path: Path, good_model_file: Path) -> None:
    broken = register_as_champion_by_hand(background_model(), "race", latent_dim=16)
    seen = _race(tmp_path, good_model_file, "race", ("background", "good"))
    versions = _versions_by_run_name("race")
    assert champion_of("race") == versions["good"]
    assert versions["background"] not in seen, seen
    assert promotion.DEMOTED_TAG in tags_of("race", broken)
    assert tags_of("race", versions["background"])[promotion.FLOOR_TAG].startswith("failed")


@pytest.mark.parametrize("stale", [True, False])
def test_a_pending_registration_is_waited_for_only_until_it_is_stale(
        stale: bool, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    # the real 300 s, scaled down; long enough that a loaded machine's tagging stays fresh
    monkeypatch.setattr(promotion, "PENDING_WAIT_S", 4.0)
    decision = register(background_model(), "m")
    client = mlflow.MlflowClient()
    client.set_model_version_tag("m", decision.version, promotion.STATE_TAG, "pending")
    since = time.time() - (promotion.PENDING_WAIT_S + 1 if stale else 0)
    client.set_model_version_tag("m", decision.version, promotion.PENDING_SINCE_TAG, repr(since))
    caplog.set_level(logging.INFO, logger="atari_vae.promotion")
    promotion._wait_for_pending(client, "m", "other")
    waited = [r for r in caplog.records if r.getMessage().startswith("waiting for the score")]
    assert bool(waited) is not stale
