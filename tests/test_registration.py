"""The register command: a trained model goes through the same floor and comparison as tune."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from click.testing import CliRunner

from atari_vae import promotion, tracking
from atari_vae.cli import main
from tests.test_promotion import background_model, log_model
from tests.test_tune import assert_stored_without_pickle

NAME = "atari-vae-breakout"


def run_register(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, ["register", "--eval_samples", "64", *args])
    return result.exit_code, result.output.strip().splitlines()


@pytest.mark.slow
def test_register_makes_a_trained_model_champion_pickle_free_and_logs_it_in_a_run(
        good_model_file: Path) -> None:
    code, lines = run_register("--model_path", str(good_model_file))
    assert code == 0, lines
    said = [line for line in lines if "champion" in line]
    assert len(said) == 1 and f"{NAME} version 1 is champion: no champion yet" in said[0]
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(NAME, "champion")
    assert version.tags[promotion.FLOOR_TAG] == promotion.PASSED
    assert str(good_model_file.resolve()) in version.tags["source_model"]
    run = client.get_run(version.run_id)
    assert run.data.tags["job"] == "register" and run.info.status == "FINISHED"
    assert run.data.tags["champion_version"] == "1"
    assert_stored_without_pickle(f"models:/{NAME}@champion")


def test_register_of_a_model_below_the_floor_exits_0_and_says_no_champion_in_one_line(
        tmp_path: Path) -> None:
    path = tmp_path / "background.pt"
    torch.save(background_model().state_dict(), path)
    code, lines = run_register("--model_path", str(path), "--model_name", "bg")
    assert code == 0, lines
    said = [line for line in lines if "champion" in line]
    assert len(said) == 1 and "bg version 1 is registered but not champion" in said[0]
    assert said[0].endswith("no champion is set") and "below the quality floor" in said[0]
    assert mlflow.MlflowClient().get_registered_model("bg").aliases == {}


def test_register_of_a_logged_run_model_registers_that_run(tmp_path: Path) -> None:
    uri, run_id = log_model(background_model(), "trained")
    code, lines = run_register("--model_path", f"runs:/{run_id}/breakout", "--model_name", "bg")
    assert code == 0, lines
    assert mlflow.MlflowClient().get_model_version("bg", "1").run_id == run_id


@pytest.mark.parametrize("args, message", [
    (["--model_name", "it's"], "Error: --model_name \"it's\" is not allowed"),
    (["--model_path", "nowhere.pt"], "Error: model file nowhere.pt does not exist"),
    (["--eval_samples", "0"], "Error: --eval_samples must be positive, got 0"),
])
def test_bad_register_input_is_one_line_and_leaves_no_store(args: list[str], message: str,
                                                            tmp_path: Path) -> None:
    code, lines = run_register(*args)
    assert code == 1 and len(lines) == 1 and lines[0].startswith(message), lines
    assert not (tmp_path / "mlflow.db").exists()


def test_register_runs_under_mlflow_run_in_the_run_mlflow_created(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tracking.configure("atari-vae")
    client = mlflow.MlflowClient()
    created = client.create_run(mlflow.get_experiment_by_name("atari-vae").experiment_id)
    client.log_param(created.info.run_id, "model_name", "")  # as `mlflow run -P` logs it
    monkeypatch.setenv("MLFLOW_RUN_ID", created.info.run_id)
    path = tmp_path / "background.pt"
    torch.save(background_model().state_dict(), path)
    code, lines = run_register("--model_path", str(path), "--model_name", "bg")
    assert code == 0, lines
    assert client.get_model_version("bg", "1").run_id == created.info.run_id


def test_register_options_are_the_register_config_fields_with_their_defaults() -> None:
    from atari_vae.config import RegisterConfig, fields_of

    options = {p.name: p for p in main.commands["register"].params}
    assert set(options) == {f.name for f in fields_of(RegisterConfig)}
    for f in fields_of(RegisterConfig):
        assert options[f.name].default == f.default, f.name
