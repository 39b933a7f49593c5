"""MLproject: generated from the configs, parsed by click to the defaults, run by `mlflow run`."""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from atari_vae import cli, mlproject, registry
from atari_vae.config import fields_of
from atari_vae.jobs import RUN_ID_FILE
from tests.conftest import REPO


def _spec() -> dict:
    return yaml.safe_load((REPO / "MLproject").read_text())


def test_mlproject_file_is_exactly_what_the_generator_renders():
    assert (REPO / "MLproject").read_text() == mlproject.render(), (
        "MLproject is stale: run `python -m atari_vae.mlproject > MLproject`")


@pytest.mark.parametrize("entry", list(mlproject.ENTRY_POINTS))
def test_entry_point_lists_every_non_cli_only_field_with_its_default(entry):
    spec = _spec()["entry_points"][entry]
    fields = [f for f in fields_of(mlproject.ENTRY_POINTS[entry]) if not f.metadata["cli_only"]]
    assert list(spec["parameters"]) == [f.name for f in fields]
    for f in fields:
        assert spec["parameters"][f.name]["default"] == f.default, f.name
        assert f"--{f.name} {{{f.name}}}" in spec["command"], f.name


@pytest.mark.parametrize("entry", list(mlproject.ENTRY_POINTS))
def test_entry_point_command_with_defaults_parses_to_the_default_config(entry):
    spec = _spec()["entry_points"][entry]
    values = {k: shlex.quote(str(p["default"])) for k, p in spec["parameters"].items()}
    argv = shlex.split(spec["command"].format(**values))
    assert argv[:4] == ["python", "-m", "atari_vae", entry]
    config_cls = mlproject.ENTRY_POINTS[entry]
    ctx = cli.main.commands[entry].make_context(entry, argv[4:])
    assert config_cls(**ctx.params) == config_cls()


def test_project_declares_exactly_one_environment_that_exists():
    spec = _spec()
    declared = [k for k in ("conda_env", "python_env", "docker_env") if k in spec]
    assert declared == ["conda_env"]  # MLflow refuses a project with more than one
    assert (REPO / spec["conda_env"]).is_file()


@pytest.mark.slow
def test_mlflow_run_train_logs_into_the_run_mlflow_created(tmp_path: Path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}"}
    params = dict(env_name="breakout", num_episodes=3, max_steps=60, epochs=2, batch_size=32,
                  latent_dim=8, checkpoint_freq=1, device="cpu", output_dir=str(out))
    command = [str(Path(venv_bin) / "mlflow"), "run", str(REPO), "-e", "train",
               "--env-manager", "local", "--experiment-name", "atari-vae-mlproject"]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, "the entry point must log into the run `mlflow run` created"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert (out / RUN_ID_FILE).read_text().strip() == run.info.run_id
    assert run.data.tags["mlflow.project.entryPoint"] == "train"
    assert run.data.tags["game"] == "Breakout"
    train_fields = {f.name for f in dataclasses.fields(mlproject.ENTRY_POINTS["train"])}
    assert set(run.data.params) >= train_fields - {"resume"}
    for key in ("train/loss", "val/loss", "val/psnr", "val/accuracy"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"training_curves.png", "final_reconstructions.png"} <= artifacts
    assert (out / "checkpoint_epoch_2.pt").is_file()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    logged = registry.load_model(f"runs:/{run.info.run_id}/breakout")
    best = torch.load(out / "best_model.pt", weights_only=True)
    assert all(torch.equal(v, best[k]) for k, v in logged.state_dict().items())
