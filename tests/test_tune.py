"""The tune job on tiny real data: trials, nested MLflow runs, registration, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from click.testing import CliRunner

from atari_vae import promotion, study, tracking, tune
from atari_vae.cli import main
from atari_vae.config import TuneConfig, fields_of
from atari_vae.errors import AtariVaeError
from tests.conftest import REPO, tiny_train_flags

DIVERGING_KL_WEIGHT = 1e39  # overflows float32: the loss turns inf/NaN in the first step


def tiny_tune_flags(out_dir: Path | str, **overrides: object) -> dict[str, object]:
    """TuneConfig kwargs for a seconds-long study: tiny frames, 2 epochs, latent 8 or 16."""
    flags = tiny_train_flags(out_dir, checkpoint_freq=1000)
    del flags["latent_dim"]  # not a tune flag: each trial draws its own
    # These studies test the mechanics, not the rate budget: with the mask head their tiny
    # models carry ~50 nats a frame, the default budget's edge, so the budget is set wide.
    flags.update(n_trials=3, study_name="tiny", latent_dim_min=8, latent_dim_max=16,
                 kl_weight_min=1e-3, kl_weight_max=1.0, eval_samples=64, kl_budget=500.0)
    flags.update(overrides)
    return flags


def child_runs(parent_id: str) -> list[mlflow.entities.Run]:
    """Runs that carry the tag mlflow.parentRunId = parent_id, in any experiment."""
    experiments = [e.experiment_id for e in mlflow.search_experiments()]
    return mlflow.MlflowClient().search_runs(
        experiments, f"tags.mlflow.parentRunId = '{parent_id}'", order_by=["start_time ASC"])


@pytest.mark.slow
def test_tiny_study_logs_nested_trials_fails_a_diverging_one_and_registers_a_loadable_model(
        tmp_path: Path) -> None:
    cfg = TuneConfig(**tiny_tune_flags(tmp_path / "out"))
    storage = study.resolve_storage("")
    assert storage == f"sqlite:///{tmp_path / 'optuna.db'}"  # beside mlflow.db
    # Trial 0 is queued to diverge: the study must mark it FAIL and go on.
    optuna.create_study(storage=storage, study_name="tiny", direction="maximize") \
        .enqueue_trial({"kl_weight": DIVERGING_KL_WEIGHT, "latent_dim": 8})

    result = tune.tune_job(cfg)

    trials = optuna.load_study(study_name="tiny", storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL] + \
        [optuna.trial.TrialState.COMPLETE] * 2
    assert "NonFiniteLossError" in trials[0].user_attrs["error"]
    for t in trials[1:]:
        assert set(t.params) == {"kl_weight", "latent_dim"}
        assert t.params["latent_dim"] in (8, 16) and 1e-3 <= t.params["kl_weight"] <= 1.0
        assert (tmp_path / "out" / f"trial_{t.number}" / "best_model.pt").is_file()
    best = max(trials[1:], key=lambda t: t.value)
    assert result.best_trial == best.number and result.best_params == best.params

    children = child_runs(result.run_id)
    assert len(children) == 3
    by_trial = {int(r.data.tags["optuna_trial"]): r for r in children}
    assert by_trial[0].info.status == "FAILED" and by_trial[0].data.tags["optuna_state"] == "FAIL"
    client = mlflow.MlflowClient()
    for t in trials[1:]:
        run = by_trial[t.number]
        assert run.info.run_id == t.user_attrs["mlflow_run_id"]
        assert float(run.data.params["kl_weight"]) == pytest.approx(t.params["kl_weight"])
        assert int(run.data.params["latent_dim"]) == t.params["latent_dim"]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [1, 2]
    parent = client.get_run(result.run_id)
    assert int(parent.data.params["best_latent_dim"]) == best.params["latent_dim"]
    # every param the parent logs is one the job used: no kl_weight, latent_dim or resume
    assert set(parent.data.params) == {f.name for f in fields_of(TuneConfig)} | {
        "best_kl_weight", "best_latent_dim"}
    assert parent.data.metrics["study/best_value"] == pytest.approx(best.value)
    plots = {a.path for a in client.list_artifacts(result.run_id, "study_plots")}
    assert {"study_plots/optimization_history.png", "study_plots/param_importances.png"} <= plots

    name = "atari-vae-breakout"
    version = client.get_model_version(name, result.decision.version)
    assert version.run_id == best.user_attrs["mlflow_run_id"]
    assert version.tags["latent_dim"] == str(best.params["latent_dim"])
    assert version.tags["game"] == "Breakout" and "preprocess" in version.tags["preprocessing"]
    assert float(version.tags["val_balanced_psnr"]) == pytest.approx(best.value, abs=1e-3)
    # Two epochs on 180 frames learn no objects: registered, but below the floor, no champion.
    assert version.tags[promotion.FLOOR_TAG].startswith("failed: Breakout: ")
    assert result.decision.champion is None and "no champion is set" in result.decision.reason
    assert version.tags[promotion.DECISION_TAG] == result.decision.reason
    assert_stored_without_pickle(f"models:/{name}/{version.version}")
    assert_fresh_process_encodes_raw_observation(name, version.version,
                                                 best.params["latent_dim"], tmp_path)


def assert_stored_without_pickle(uri: str) -> None:
    """No pickle files and no stored code: the pyfunc loads through the installed package."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    files = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth", ".py"))], files
    assert {"data/vae/model.safetensors", "data/vae/config.json"} <= set(files)
    pyfunc = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert "python_model" not in pyfunc and not pyfunc.get("code")
    assert pyfunc["loader_module"] == "atari_vae.pyfunc_model"


def assert_fresh_process_encodes_raw_observation(name: str, version: str, latent_dim: int,
                                                 cwd: Path) -> None:
    code = (
        "import ale_py, gymnasium as gym, atari_vae\n"
        "gym.register_envs(ale_py)\n"
        "obs, _ = gym.make('ALE/Breakout-v5').reset(seed=1)\n"
        f"vae = atari_vae.load_registered({name!r}, version={version!r})\n"
        "mu, logvar = vae.encode(atari_vae.preprocess(obs))\n"
        "print('SHAPE', tuple(mu.shape), type(vae).__name__, vae.training)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"SHAPE (1, {latent_dim}) VAE False" in out.stdout


@pytest.mark.slow
def test_study_without_a_trial_within_the_rate_budget_registers_nothing_and_says_why(
        tmp_path: Path) -> None:
    cfg = TuneConfig(**tiny_tune_flags(tmp_path / "out", n_trials=1, kl_budget=1e-9,
                                       kl_weight_min=1e-3, kl_weight_max=1e-3))
    with pytest.raises(AtariVaeError, match=r"no feasible complete trial.*--kl_budget"):
        tune.tune_job(cfg)
    assert mlflow.search_registered_models() == []
    parents = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
               if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.status for r in parents] == ["FAILED"]


def test_trial_runs_nest_under_the_run_that_mlflow_run_created(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # mlflow issue 15713: nested runs lost their parent while MLFLOW_RUN_ID was set.
    tracking.configure("atari-vae")
    client = mlflow.MlflowClient()
    created = client.create_run(mlflow.get_experiment_by_name("atari-vae").experiment_id)
    monkeypatch.setenv("MLFLOW_RUN_ID", created.info.run_id)
    with tracking.tracked_run("tune") as parent, \
            tracking.tracked_run("trial-0", nested=True) as child:
        pass
    assert parent.info.run_id == created.info.run_id
    assert client.get_run(child.info.run_id).data.tags["mlflow.parentRunId"] == \
        created.info.run_id


@pytest.mark.parametrize("flags, message", [
    (["--storage", "nonsense://nowhere"], "--storage 'nonsense://nowhere' cannot be opened"),
    (["--storage", "postgresql://postgres@127.0.0.1:1/test"], "--storage"),
    (["--n_trials", "0"], "--n_trials must be at least 1"),
    (["--latent_dim_min", "9", "--latent_dim_max", "15"], "no power of two"),
    (["--kl_budget", "0"], "--kl_budget must be positive"),
    (["--model_name", "it's"], "--model_name \"it's\" is not allowed"),
])
def test_bad_tune_flags_give_one_line_and_exit_1(flags: list[str], message: str,
                                                   tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["tune", "--output_dir", str(tmp_path / "o"), *flags])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bad_model_name_fails_before_any_work(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["tune", "--model_name", "it's", "--output_dir",
                                       str(tmp_path / "o")])
    assert result.exit_code == 1  # the message itself: test_bad_tune_flags_give_one_line...
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no store, no study, no output


@pytest.mark.parametrize("flag", ["--kl_weight", "--latent_dim"])
def test_tune_offers_no_flag_that_each_trial_draws_itself(flag: str) -> None:
    result = CliRunner().invoke(main, ["tune", flag, "1"])
    assert result.exit_code == 2 and f"No such option '{flag}'" in result.output


@pytest.mark.slow
def test_tune_exits_0_and_says_in_one_line_that_no_champion_was_set(tmp_path: Path) -> None:
    flags = tiny_tune_flags(tmp_path / "out", n_trials=1)
    args = [arg for k, v in flags.items() for arg in (f"--{k}", str(v))]
    result = CliRunner().invoke(main, ["tune", *args])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "champion" in line]
    assert len(lines) == 1, lines
    assert "atari-vae-breakout version 1 is registered but not champion" in lines[0]
    assert "below the quality floor" in lines[0] and lines[0].endswith("no champion is set")
    assert mlflow.MlflowClient().get_registered_model("atari-vae-breakout").aliases == {}
