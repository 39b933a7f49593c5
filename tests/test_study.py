"""The study's storage (checked before any work, never the MLflow store) and the trial it picks."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from atari_vae import study, tracking
from atari_vae.cli import main


def tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def test_default_storage_is_optuna_db_beside_mlflow_db(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert study.resolve_storage("sqlite:///x.db") == "sqlite:///x.db"
    # The store in another folder than the working directory (the fixture's), so "beside
    # mlflow.db" and "in the working directory" give different answers.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'team' / 'mlflow.db'}")
    assert study.resolve_storage("") == f"sqlite:///{tmp_path / 'team' / 'optuna.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # a server: no folder
    assert study.resolve_storage("") == f"sqlite:///{tmp_path / 'optuna.db'}"


def test_storage_pointing_at_the_mlflow_store_is_refused_without_touching_it(
        tmp_path: Path) -> None:
    tracking.configure("atari-vae")
    db = tmp_path / "mlflow.db"
    before, size = tables(db), db.stat().st_size
    for url in (f"sqlite:///{db}", "sqlite:///mlflow.db"):
        result = CliRunner().invoke(main, ["tune", "--storage", url, "--output_dir",
                                           str(tmp_path / "o")])
        assert result.exit_code == 1, result.output
        assert result.output.strip().splitlines() == [
            f"Error: --storage '{url}' is an MLflow store; give Optuna its own database, "
            f"e.g. sqlite:///optuna.db or postgresql://user@host:5432/optuna"]
    assert tables(db) == before and "studies" not in before and db.stat().st_size == size


def test_a_copy_of_an_mlflow_store_is_refused_too(tmp_path: Path) -> None:
    tracking.configure("atari-vae")
    copy = tmp_path / "elsewhere.db"
    shutil.copy(tmp_path / "mlflow.db", copy)
    result = CliRunner().invoke(main, ["tune", "--storage", f"sqlite:///{copy}"])
    assert result.exit_code == 1 and "is an MLflow store" in result.output
    assert "studies" not in tables(copy)


def test_best_feasible_trial_skips_trials_over_the_rate_budget() -> None:
    s = optuna.create_study(direction="maximize")
    for value, over in ((30.0, 5.0), (20.0, -1.0), (25.0, 0.0), (40.0, 1e-6)):
        trial = s.ask()
        trial.set_constraint(study.CONSTRAINT, over)
        s.tell(trial, value)
    best = study.best_feasible_trial(s)
    assert best is not None and best.value == 25.0
