"""Several tune workers on one study in the real PostgreSQL server; a killed worker's trial."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import optuna
import pytest

from atari_vae import promotion, study, tracking
from tests.conftest import REPO
from tests.test_tune import child_runs, tiny_tune_flags

POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"  # as a user types it, for the workers
DB = study.with_installed_driver(POSTGRES)  # for this test's own Optuna calls
pytestmark = [pytest.mark.postgres, pytest.mark.slow]
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@pytest.fixture
def study_name() -> str:
    """A study name no other test run uses; the study is deleted afterwards."""
    name = f"pytest-{uuid.uuid4().hex[:12]}"
    yield name
    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name=name, storage=DB)


def tune_command(out: Path, study_name: str, **overrides: object) -> list[str]:
    flags = tiny_tune_flags(out, study_name=study_name, storage=POSTGRES, model_name=study_name,
                            **overrides)
    args = [arg for k, v in flags.items() for arg in (f"--{k}", str(v))]
    return [sys.executable, "-m", "atari_vae", "tune", *args]


def start(command: list[str], cwd: Path) -> subprocess.Popen:
    """A worker process whose output goes to a log file (a full pipe would block it)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = (cwd / f"worker-{uuid.uuid4().hex[:6]}.log").open("w")
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = Path(log.name)
    return proc


def output(proc: subprocess.Popen) -> str:
    return proc.log_path.read_text()[-3000:]


def finish(proc: subprocess.Popen) -> None:
    proc.wait(timeout=600)
    assert proc.returncode == 0, output(proc)


def test_two_workers_share_one_study_without_duplicate_trials(tmp_path: Path,
                                                              study_name: str) -> None:
    tracking.configure("atari-vae")  # the store exists before the workers start
    workers = [start(tune_command(tmp_path / "out", study_name, n_trials=2), tmp_path)
               for _ in range(2)]
    for worker in workers:
        finish(worker)

    trials = optuna.load_study(study_name=study_name, storage=DB).trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state in FINISHED for t in trials), [t.state for t in trials]
    assert len({t.user_attrs["mlflow_run_id"] for t in trials}) == 4  # each trial ran once
    parents = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
               if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and all(r.info.status == "FINISHED" for r in parents)
    assert sorted(len(child_runs(p.info.run_id)) for p in parents) == [2, 2]
    client = mlflow.MlflowClient()
    versions = client.search_model_versions(f"name='{study_name}'")
    assert versions and all(v.tags.get(promotion.STATE_TAG) == "done" for v in versions)
    scores = {str(v.version): promotion.valid_score(v.tags, v.tags[promotion.EVAL_TAG])
              for v in versions}
    eligible = {v: s for v, s in scores.items() if s is not None}
    aliases = client.get_registered_model(study_name).aliases
    # tiny trials rarely clear the quality floor; when one does, the best one holds the alias
    holder = str(aliases["champion"]) if "champion" in aliases else None
    assert holder == (max(eligible, key=eligible.get) if eligible else None)


def test_killed_worker_leaves_its_trial_failed_and_a_restart_continues(tmp_path: Path,
                                                                       study_name: str) -> None:
    tracking.configure("atari-vae")
    command = tune_command(tmp_path / "out", study_name, n_trials=1, epochs=8,
                           heartbeat_interval=1)
    worker = start(command, tmp_path)
    running = wait_for_running_trial(study_name, worker)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=60)
    time.sleep(3)  # past the grace period (2 heartbeats) before anyone looks again

    finish(start(command, tmp_path))

    trials = optuna.load_study(study_name=study_name, storage=DB).trials
    killed = trials[running.number]
    assert killed.state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == running.number]
    assert len(retries) == 1 and retries[0].state in FINISHED
    assert retries[0].params == running.params
    killed_run = mlflow.MlflowClient().get_run(running.user_attrs["mlflow_run_id"])
    assert killed_run.info.status == "KILLED"


def wait_for_running_trial(study_name: str, worker: subprocess.Popen,
                           deadline_s: float = 300) -> optuna.trial.FrozenTrial:
    """The first trial of the study once it runs and has its MLflow run (so, mid-trial)."""
    stop = time.monotonic() + deadline_s
    while time.monotonic() < stop:
        assert worker.poll() is None, output(worker)
        try:
            trials = optuna.load_study(study_name=study_name, storage=DB).trials
        except KeyError:  # the worker has not created the study yet
            trials = []
        for t in trials:
            if t.state == optuna.trial.TrialState.RUNNING and "mlflow_run_id" in t.user_attrs:
                return t
        time.sleep(0.2)
    raise AssertionError("no trial started running in time")
