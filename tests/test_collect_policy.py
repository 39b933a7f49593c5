"""Collecting with a registered controller: which episodes it plays, the frame cache key of a
mixed collection, determinism, and the train job's record of the mix (real ALE, real MLflow)."""

from __future__ import annotations

import dataclasses

import mlflow
import numpy as np
import pytest

from atari_vae import collect_policy, policy_registry, tracking
from atari_vae.collect import play_episodes
from atari_vae.config import TrainConfig
from atari_vae.controller import LinearController, n_params
from atari_vae.data import cache_dir, cache_key
from atari_vae.envs import resolve_game
from atari_vae.errors import AtariVaeError, ConfigError
from atari_vae.jobs import train_job
from tests.conftest import tiny_train_flags

BREAKOUT = resolve_game("Breakout")
CONTROLLER = "atari-vae-breakout-controller"
URI = f"models:/{CONTROLLER}@champion"
SEED = 2


@pytest.fixture
def controller(champion_vae) -> LinearController:
    """A controller with random weights on the champion VAE, registered as its champion."""
    ctrl = LinearController.from_params(
        np.random.default_rng(0).normal(size=n_params(8, 4, "mu")), 8, 4, "mu",
        {"game": "Breakout", "action_names": ["NOOP", "FIRE", "RIGHT", "LEFT"],
         "vae_model_name": "atari-vae-breakout", "vae_version": "1"})
    tracking.configure("controllers")
    with tracking.tracked_run("log-controller"):
        uri = policy_registry.log_controller_model(ctrl).model_uri
    policy_registry.register_controller(uri, CONTROLLER, {"vae_version": "1"}, 1.0, "p")
    return ctrl


def _collect(policy, num_envs: int, num_episodes: int = 4) -> dict[int, np.ndarray]:
    frames: dict[int, np.ndarray] = {}
    play_episodes(BREAKOUT, num_episodes, 40, SEED, frames.__setitem__, progress=False,
                  num_envs=num_envs, policy=policy)
    return frames


def test_a_mixed_collection_keys_its_cache_by_the_pinned_controller_mix_and_epsilon(controller):
    policy = collect_policy.resolve(URI, 0.5, BREAKOUT)
    assert policy.source == f"models:/{CONTROLLER}/1"  # the alias, pinned to its version
    random_key = cache_key(BREAKOUT, 4, 40, SEED)
    mixed = cache_key(BREAKOUT, 4, 40, SEED, policy)
    assert mixed != random_key and random_key == cache_key(BREAKOUT, 4, 40, SEED, None)
    assert mixed.startswith(f"breakout-4ep-40steps-seed{SEED}-mix0.5-{CONTROLLER}-v1-")
    others = [dataclasses.replace(policy, mix=0.25), dataclasses.replace(policy, epsilon=0.2),
              dataclasses.replace(policy, source=f"models:/{CONTROLLER}/2")]
    keys = {cache_key(BREAKOUT, 4, 40, SEED, p) for p in others}
    assert len(keys) == 3 and mixed not in keys and random_key not in keys
    assert collect_policy.resolve("random", 0.5, BREAKOUT) is None
    assert collect_policy.resolve(URI, 0.0, BREAKOUT) is None


def test_the_controller_plays_its_share_the_rest_stay_the_random_episodes_frame_for_frame(
        controller):
    policy = collect_policy.resolve(URI, 0.5, BREAKOUT)
    played = [policy.plays(SEED, r) for r in range(4)]
    assert any(played) and not all(played), played  # the seed gives both kinds
    random, mixed, mixed_one_env = _collect(None, 3), _collect(policy, 3), _collect(policy, 1)
    for r in range(4):
        np.testing.assert_array_equal(mixed[r], mixed_one_env[r])  # env count changes nothing
        same = mixed[r].shape == random[r].shape and np.array_equal(mixed[r], random[r])
        assert same != played[r], r


def test_train_job_collects_with_the_controller_and_records_the_mix(controller, tmp_path):
    cfg = TrainConfig(**tiny_train_flags(tmp_path / "out", epochs=1, num_episodes=4),
                      collect_policy=URI, policy_mix=0.5)
    train_job(cfg)
    run = mlflow.MlflowClient().search_runs(
        [mlflow.get_experiment_by_name("atari-vae").experiment_id],
        "tags.job = 'train'")[0]
    assert (run.data.params["collect_policy"], run.data.params["policy_mix"]) == (URI, "0.5")
    assert run.data.tags["collect_policy"] == (f"models:/{CONTROLLER}/1 mix=0.5 "
                                               f"epsilon={collect_policy.EPSILON}")
    expected = sum(collect_policy.resolve(URI, 0.5, BREAKOUT).plays(42, r) for r in range(4))
    assert run.data.metrics["data/policy_episodes"] == expected
    assert any("mix0.5" in p.name for p in cache_dir().iterdir())


@pytest.mark.parametrize("flags, fragment", [
    (dict(collect_policy="models:/x"), "--collect_policy must be"),
    (dict(collect_policy="greedy"), "--collect_policy must be"),
    (dict(collect_policy=URI, env_name="Breakout,Pong"), "one game"),
    (dict(policy_mix=1.5), "--policy_mix"),
])
def test_bad_collect_policy_flags_are_refused_in_one_line(flags, fragment):
    with pytest.raises(ConfigError, match=fragment) as err:
        TrainConfig(**flags).validate()
    assert "\n" not in str(err.value)


def test_a_controller_planned_with_the_env_serving_is_refused_in_one_line(champion_vae):
    ctrl = LinearController.from_params(np.zeros(n_params(8, 4, "mu")), 8, 4, "mu",
                                        {"game": "Breakout", "serve": "auto",
                                         "vae_model_name": "atari-vae-breakout",
                                         "vae_version": "1"})
    tracking.configure("controllers")
    with tracking.tracked_run("log-controller"):
        uri = policy_registry.log_controller_model(ctrl).model_uri
    policy_registry.register_controller(uri, CONTROLLER, {"vae_version": "1"}, 1.0, "p")
    with pytest.raises(AtariVaeError, match="--serve auto") as err:
        collect_policy.resolve(URI, 0.5, BREAKOUT)
    assert "\n" not in str(err.value)


def test_a_missing_controller_says_how_to_make_one(champion_vae):
    with pytest.raises(AtariVaeError, match="no registered model 'nope-controller'"):
        collect_policy.resolve("models:/nope-controller@champion", 0.5, BREAKOUT)


def test_evaluate_scores_frames_of_controller_played_episodes_and_records_the_policy(
        controller, tmp_path):
    from atari_vae.config import EvaluateConfig
    from atari_vae.evaluate import evaluate_job, held_out_set

    flags = dict(model_path="models:/atari-vae-breakout@champion", num_samples=40,
                 max_steps=40, probe_frames=0, device="cpu", output_dir=str(tmp_path / "ev"))
    played = EvaluateConfig(**flags, collect_policy=URI)
    random_frames = held_out_set(BREAKOUT, EvaluateConfig(**flags))[0].frames_uint8[:]
    assert not np.array_equal(held_out_set(BREAKOUT, played)[0].frames_uint8[:], random_frames)
    doc = evaluate_job(played)
    assert doc["collect_policy"] == URI and doc["policy_mix"] == 1.0
    assert mlflow.get_run(doc["run_id"]).data.tags["collect_policy"] == f"{URI} (mix 1)"
