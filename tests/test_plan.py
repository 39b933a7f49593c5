"""The plan job against a real SQLite MLflow store and real ALE: metrics in the right run,
the controller registered beside its VAE version, ``load_policy`` by name, bad input, seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch

import atari_vae
from atari_vae import plan, policy_registry, tracking
from atari_vae.config import PlanConfig
from atari_vae.controller import LinearController, load_controller_dir, make_features
from atari_vae.envs import fire_action, make_env, resolve_game
from atari_vae.errors import AtariVaeError, ConfigError
from atari_vae.plan_job import plan_job
from atari_vae.rollout import EnvPool, FixedActor, play
from tests.conftest import REPO

VAE_NAME = "atari-vae-breakout"
TINY = dict(env_name="Breakout", generations=2, popsize=4, episodes_per_candidate=1,
            max_steps=50, test_episodes=3, experiment_name="plan-test")


def test_plan_job_logs_generations_registers_the_controller_and_load_policy_plays(
        champion_vae, tmp_path):
    result = plan_job(PlanConfig(**TINY, output_dir=str(tmp_path / "plan")))
    client = mlflow.MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert (tags["job"], tags["vae_model_name"], tags["vae_version"]) == ("plan", VAE_NAME, "1")
    assert "mlflow.parentRunId" not in tags
    for key in ("plan/score_mean", "plan/score_best", "plan/score_worst",
                "plan/control_score_mean"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1], key
    metrics = run.data.metrics
    for key in ("plan/test_score_mean", "plan/test_score_std", "plan/random_policy_score_mean",
                "plan/fixed_action_score_mean", "plan/control_test_score_mean"):
        assert np.isfinite(metrics[key]), key
    assert tags["fixed_action"] == result.fixed_action
    assert result.fixed_action in ("NOOP", "FIRE", "RIGHT", "LEFT")
    assert f"best fixed action: {result.fixed_action}" in result.table
    assert metrics["plan/test_score_mean"] == pytest.approx(
        result.scores["ours (VAE z)"].mean())
    assert {"policy_strip.png", "summary.txt", "scores.json"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)}
    assert run.data.params["popsize"] == "4"

    name = f"{VAE_NAME}-controller"
    assert (result.controller_name, result.controller_version) == (name, "1")
    version = client.get_model_version(name, "1")
    assert (version.tags["vae_model_name"], version.tags["vae_version"]) == (VAE_NAME, "1")
    assert "serve=" not in version.tags["test_protocol"]  # the default keeps its protocol
    assert str(client.get_registered_model(name).aliases["champion"]) == "1"
    logged = client.list_artifacts(version.run_id, "controller")
    assert not any(a.path.endswith((".pkl", ".pickle")) for a in logged)

    policy = atari_vae.load_policy(name)  # alias champion
    env = make_env(resolve_game("Breakout"))
    frames = []
    obs, _ = env.reset(seed=5)
    for action in (1, 2, 3, 0):
        frames.append(obs)
        obs, *_ = env.step(action)
    env.close()
    raw = np.stack(frames)
    actions = policy(raw)
    assert raw.shape == (4, 210, 160, 3) and actions.shape == (4,)
    assert actions.dtype == np.int64 and set(actions.tolist()) <= set(range(4))
    by_hand = load_controller_dir(policy_registry.download_controller_dir(f"models:/{name}/1"))
    vae = atari_vae.load_registered(VAE_NAME, version=1)
    with torch.no_grad():
        mu = vae.encode(atari_vae.preprocess(raw))[0].numpy()
    np.testing.assert_array_equal(actions, by_hand.act(make_features(mu, None, "mu")))
    assert all(torch.equal(v, champion_vae.state_dict()[k])
               for k, v in policy.vae.state_dict().items())


def _logged_controller() -> str:
    ctrl = LinearController.from_params(np.zeros(4 * 9), 8, 4, "mu",
                                        {"vae_model_name": VAE_NAME, "vae_version": "1"})
    with tracking.tracked_run("log-controller"):
        return policy_registry.log_controller_model(ctrl).model_uri


def test_a_controller_becomes_champion_only_by_beating_the_champions_score_on_its_protocol():
    tracking.configure("controllers")
    name, tags = f"{VAE_NAME}-controller", {"vae_model_name": VAE_NAME, "vae_version": "1"}
    steps = [(1.0, "p", ("1", True)), (0.5, "p", ("2", False)), (2.0, "p", ("3", True)),
             (9.0, "other", ("4", False))]
    for score, protocol, (version, moved) in steps:
        got = policy_registry.register_controller(_logged_controller(), name, tags, score,
                                                  protocol)
        assert (got[0], got[2]) == (version, moved), got[1]
    client = mlflow.MlflowClient()
    assert str(client.get_registered_model(name).aliases["champion"]) == "3"
    assert "not compared" in client.get_model_version(name, "4").tags["champion_decision"]
    # with a way to play the champion on the new protocol, it is re-scored and then compared
    played = []
    got = policy_registry.register_controller(
        _logged_controller(), name, tags, 3.0, "other",
        rescore=lambda version: played.append(version) or 2.5)
    assert played == ["3"] and got[0] == "5" and got[2], got[1]
    got = policy_registry.register_controller(_logged_controller(), name, tags, 99.0, "third",
                                              rescore=lambda version: None)
    assert not got[2] and "not compared" in got[1]  # a champion that cannot play it stays
    old = client.get_model_version(name, "3").tags
    assert (old["test_protocol"], float(old["test_score_mean"])) == ("p", 2.0)  # its own
    assert float(old[policy_registry.protocol_score_tag("other")]) == 2.5
    got = policy_registry.register_controller(_logged_controller(), name, tags, 2.9, "other",
                                              rescore=lambda version: played.append(version))
    assert got[0] == "7" and not got[2] and played == ["3"], got[1]  # same protocol: no replay


def test_plan_refuses_a_model_without_the_alias_in_one_line(champion_vae):
    with pytest.raises(AtariVaeError, match="has no version with the alias 'best'"):
        plan_job(PlanConfig(**{**TINY, "alias": "best"}))


def test_cli_with_an_unknown_model_exits_non_zero_with_one_line_and_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "atari_vae", "plan", "--model_name",
                             "no-such-vae"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    assert "no registered model 'no-such-vae'" in lines[0]
    assert "atari-vae register" in lines[0] and "atari-vae tune" in lines[0]
    assert mlflow.MlflowClient().search_runs(
        [e.experiment_id for e in mlflow.MlflowClient().search_experiments()]) == []


def test_a_plan_that_crashes_ends_its_run_failed(champion_vae, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError):
        plan_job(PlanConfig(**TINY, output_dir=str(blocker)))
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("plan-test").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_test_seeds_never_meet_training_seeds_and_too_many_generations_are_refused():
    cfg = PlanConfig(generations=50, episodes_per_candidate=3, seed=7)
    trained = np.concatenate([plan.train_seeds(cfg, g) for g in range(cfg.generations)])
    assert len(set(trained.tolist())) == 150
    assert not set(trained.tolist()) & set(plan.held_out_seeds(cfg).tolist())
    with pytest.raises(ConfigError, match="test seeds"):
        PlanConfig(generations=600_000, episodes_per_candidate=2).validate()


def test_an_auto_serve_plan_names_the_rule_in_its_protocol_and_its_controller(
        champion_vae, tmp_path):
    cfg = PlanConfig(**{**TINY, "generations": 1, "control": "none", "serve": "auto"},
                     output_dir=str(tmp_path / "plan"))
    result = plan_job(cfg)
    version = mlflow.MlflowClient().get_model_version(result.controller_name, "1")
    assert version.tags["test_protocol"].endswith(" serve=auto")
    policy = atari_vae.load_policy(result.controller_name, version=1)
    assert policy.serve == "auto" and policy.controller.metadata["serve"] == "auto"
    played = json.loads((tmp_path / "plan" / "scores.json").read_text())
    assert played["serve"] == "auto" and "serve: auto" in result.table


def test_an_unknown_serve_rule_is_refused_naming_the_allowed_ones():
    with pytest.raises(ConfigError, match="controller.*auto"):
        PlanConfig(serve="never").validate()


def test_the_best_fixed_action_is_the_held_action_that_scores_most_on_the_test_seeds():
    cfg = PlanConfig(max_steps=400, test_episodes=3, serve="auto")
    game = resolve_game("Breakout")
    pool = EnvPool(game, cfg.max_steps)
    try:
        best, held = plan.score_fixed_actions(pool, cfg)
        means = [play(pool.get(3), plan.held_out_seeds(cfg), FixedActor(a), 400,
                      serve_action=fire_action(game)).scores.mean() for a in range(4)]
    finally:
        pool.close()
    assert best == int(np.argmax(means)) and held.scores.mean() == max(means)
    assert max(means) > 0  # a paddle held at a wall returns some served balls
