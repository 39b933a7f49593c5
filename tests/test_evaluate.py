"""The evaluate command end to end on a tiny model trained on real ALE frames."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from atari_vae import cli
from atari_vae.config import EvaluateConfig, TrainConfig
from atari_vae.envs import resolve_game
from atari_vae.evaluate import (
    FIGURES,
    REFERENCE_SEED_OFFSET,
    SCORED_FRAMES_PER_EPISODE,
    evaluate_job,
    evenly_spaced,
    fresh_frames,
)
from atari_vae.jobs import RUN_ID_FILE, train_job
from tests.conftest import tiny_train_flags

ISSUE_KEYS = ("mse", "psnr", "accuracy", "baseline_mse", "baseline_psnr", "baseline_accuracy",
              "fg_psnr", "fg_accuracy", "baseline_fg_psnr", "baseline_fg_accuracy", "n_frames",
              "psnr_median", "psnr_p05")
SAMPLES = 40
TINY_EVAL = ["--num_samples", str(SAMPLES), "--max_steps", "60", "--device", "cpu"]
NO_PROBE = ["--probe_frames", "0"]


@dataclass
class Trained:
    model_path: Path
    tracking_uri: str
    run_id: str


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, frame_cache: Path) -> Trained:
    """One tiny real training, shared by the tests of this module (its own MLflow store)."""
    root = tmp_path_factory.mktemp("trained")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("ATARI_VAE_CACHE_DIR", str(frame_cache))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        train_job(TrainConfig(**tiny_train_flags(root / "train")))
    return Trained(root / "train" / "best_model.pt", uri,
                   (root / "train" / RUN_ID_FILE).read_text().strip())


def _evaluate(*args: str, probe: tuple[str, ...] = tuple(NO_PROBE)):
    return CliRunner().invoke(cli.evaluate, [*args, *TINY_EVAL, *probe])


def _runs(job: str = "evaluate") -> list:
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.job = '{job}'")


def test_evaluate_command_writes_every_output_and_logs_one_mlflow_run(trained, tmp_path):
    out = tmp_path / "eval"
    result = _evaluate("--model_path", str(trained.model_path), "--output_dir", str(out))
    assert result.exit_code == 0, result.output

    doc = json.loads((out / "metrics.json").read_text())
    for key in ISSUE_KEYS:  # flat keys for one game, identical to the per-game entry
        assert doc[key] == doc["games"]["Breakout"][key], key
    assert doc["n_frames"] == SAMPLES and doc["latent_dim"] == 8
    assert 0 <= doc["fg_accuracy"] <= 1 and doc["baseline_psnr"] > 20
    table = (out / "metrics.txt").read_text()
    assert "Breakout" in table and "base" in table and "foreground" in table
    for name in FIGURES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    (run,) = _runs()
    assert run.info.status == "FINISHED"
    assert run.data.tags["evaluated_model"] == str(trained.model_path.resolve())
    assert run.data.tags["evaluated_run_id"] == trained.run_id  # found beside best_model.pt
    assert run.data.tags["game"] == "Breakout"
    assert run.data.params["num_samples"] == str(SAMPLES)
    assert run.data.params["model_path"] == str(trained.model_path)
    for key in ISSUE_KEYS:
        assert run.data.metrics[f"final/{key}"] == pytest.approx(doc[key]), key
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {*FIGURES, "metrics.json", "metrics.txt"} <= artifacts


def test_logged_and_registered_models_score_exactly_like_the_state_dict(
        trained, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained.tracking_uri)
    mlflow.set_tracking_uri(trained.tracking_uri)
    version = mlflow.register_model(f"runs:/{trained.run_id}/breakout", "tiny-vae")
    MlflowClient().set_registered_model_alias("tiny-vae", "champion", version.version)

    def run(model_path: str, name: str) -> dict:
        return evaluate_job(EvaluateConfig(model_path=model_path, num_samples=SAMPLES,
                                           max_steps=60, device="cpu", probe_frames=0,
                                           output_dir=str(tmp_path / name)))

    from_file = run(str(trained.model_path), "file")
    from_run = run(f"runs:/{trained.run_id}/breakout", "run")
    from_alias = run("models:/tiny-vae@champion", "alias")
    for key in ("psnr", "fg_accuracy", "kl", "active_dims"):
        assert from_run[key] == pytest.approx(from_file[key], rel=1e-6), key
        assert from_alias[key] == pytest.approx(from_file[key], rel=1e-6), key
    tags = MlflowClient().get_run(from_alias["run_id"]).data.tags
    assert tags["evaluated_model"] == "models:/tiny-vae@champion"
    assert MlflowClient().get_run(from_run["run_id"]).data.tags["evaluated_run_id"] == \
        trained.run_id


def test_several_games_give_one_table_with_a_row_per_game(trained, tmp_path):
    out = tmp_path / "eval"
    result = _evaluate("--model_path", str(trained.model_path), "--env_name", "breakout,Pong",
                       "--output_dir", str(out))
    assert result.exit_code == 0, result.output

    doc = json.loads((out / "metrics.json").read_text())
    assert set(doc["games"]) == {"Breakout", "Pong"}
    assert "psnr" not in doc  # no flat keys: they would hide which game they belong to
    rows = [line.split()[0] for line in (out / "metrics.txt").read_text().splitlines()
            if line.startswith(("Breakout ", "Pong "))]
    assert rows == ["Breakout", "Pong", "Breakout", "Pong"]  # main table, then spread table
    (run,) = _runs()
    for game in ("Breakout", "Pong"):
        assert run.data.metrics[f"{game}/psnr"] == pytest.approx(doc["games"][game]["psnr"])
        assert run.data.metrics[f"{game}/n_frames"] == SAMPLES
    assert run.data.tags["game"] == "Breakout,Pong"


@pytest.mark.parametrize("model_path, message", [
    ("no/such/model.pt", "does not exist"),
    ("foreign.pt", "is not a readable atari-vae model"),
    ("models:/no-such-model@champion", "cannot load models:/no-such-model@champion"),
])
def test_bad_model_path_gives_one_line_error_and_no_run(tmp_path, caplog, model_path, message):
    caplog.set_level(logging.WARNING, logger="mlflow")  # as the CLI's logging set-up does
    (tmp_path / "foreign.pt").write_text("not a model")
    result = _evaluate("--model_path", model_path, "--output_dir", str(tmp_path / "eval"))
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    store = tmp_path / "mlflow.db"  # only the models:/ lookup opens the store at all
    assert not store.exists() or _runs() == []
    assert not (tmp_path / "eval").exists()  # nothing written for a model that cannot load


def test_fresh_frames_are_the_same_when_collected_again_and_differ_at_the_reference_seed(
        tmp_path, monkeypatch):
    game = resolve_game("Breakout")
    # 4 episodes of at most 30 frames cannot give 150 frames: the episode count must grow.
    frames = fresh_frames(game, 150, 30, seed=123, progress=False)
    # Played again from nothing (an empty frame cache), not read back from the first's.
    monkeypatch.setenv("ATARI_VAE_CACHE_DIR", str(tmp_path / "empty-cache"))
    again = fresh_frames(game, 150, 30, seed=123, progress=False)
    assert (tmp_path / "empty-cache").is_dir()
    other = fresh_frames(game, 150, 30, seed=123 + REFERENCE_SEED_OFFSET, progress=False)
    assert len(frames) >= 150
    assert torch.equal(frames.frames_uint8, again.frames_uint8)
    picked = evenly_spaced(frames, 150)
    assert len(picked) == 150 and len(picked.episode_ids.unique()) == len(
        frames.episode_ids.unique())
    n = min(len(frames), len(other))
    assert not torch.equal(frames.frames_uint8[:n], other.frames_uint8[:n])


def test_scored_frames_come_from_one_episode_per_fifty_frames_at_least():
    # Full Breakout episodes (~190 frames) could give 300 frames from 2 episodes; a score that
    # rests on 2 episodes' knocked-out bricks would swing from seed to seed.
    frames = fresh_frames(resolve_game("Breakout"), 300, 1000, seed=321, progress=False)
    assert len(frames.episode_ids.unique()) >= 300 // SCORED_FRAMES_PER_EPISODE


def test_evaluate_probes_the_game_state_and_logs_scores_and_the_variable_table(trained,
                                                                               tmp_path):
    out = tmp_path / "eval"
    result = _evaluate("--model_path", str(trained.model_path), "--output_dir", str(out),
                       probe=("--probe_frames", "500"))
    assert result.exit_code == 0, result.output

    doc = json.loads((out / "metrics.json").read_text())
    for source in ("probe_score", "probe_score_random_init", "probe_score_majority"):
        assert 0.0 <= doc[source] <= 1.0, source
    assert "probe_f1_player_x" in doc and "probe_r2_player_x" in doc
    probe = json.loads((out / "state_probe.json").read_text())["Breakout"]
    assert probe["variables"][:3] == ["ball_x", "ball_y", "player_x"]
    assert probe["score"]["model"] == pytest.approx(doc["probe_score"])
    assert set(probe["f1"]) == {"model", "random_init", "majority"}
    assert all(probe["entropy"][name] >= 0.6 for name in probe["variables"])
    assert sum(probe["n_frames"].values()) <= 500 + 60  # split of whole episodes, test deduplicated
    assert "game score" in (out / "state_probe.txt").read_text()
    (run,) = _runs()
    assert run.data.metrics["probe/score"] == pytest.approx(doc["probe_score"])
    assert run.data.metrics["probe/f1_ball_x"] == pytest.approx(doc["probe_f1_ball_x"])
    assert 0.0 <= run.data.metrics["final/object_recall"] <= 1.0
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"state_probe.txt", "state_probe.json"} <= artifacts
