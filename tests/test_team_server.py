"""A team's deployment for real: scripts/team-server.sh (MLflow on PostgreSQL, proxied
artifacts), training through a server outage, a two-worker tune, loading from another process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import optuna
import psycopg2
import pytest
import requests

from tests.conftest import GOOD_TRAINING, REPO, free_port, tiny_train_flags
from tests.test_multiworker import DB, finish, output, start, tune_command

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
SERVER_START_S = 400  # a cold MLflow server imports for a minute or more on two busy cores
EPOCHS = 6


class TeamServer:
    """scripts/team-server.sh in its own process group, on a free loopback port."""

    def __init__(self, folder: Path) -> None:
        self.port, self.folder = free_port(), folder
        self.db = f"atari_vae_pytest_{uuid.uuid4().hex[:10]}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        env = {**os.environ, "PORT": str(self.port), "MLFLOW_DB": self.db, "WORKERS": "1",
               "ARTIFACTS_DIR": str(self.folder / "artifacts"), "PYTHON": sys.executable}
        self.log = self.folder / f"server-{self.starts}.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(["bash", str(REPO / "scripts" / "team-server.sh")],
                                         env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + SERVER_START_S
        while not self.healthy():
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(1)

    def healthy(self) -> bool:
        try:
            return requests.get(f"{self.url}/health", timeout=10).ok
        except requests.RequestException:
            return False

    def kill(self) -> None:
        """SIGKILL the whole server (script, MLflow CLI, uvicorn workers): a crash."""
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=60)

    def drop_database(self) -> None:
        conn = psycopg2.connect("postgresql://postgres@127.0.0.1:5432/postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
        conn.close()


@pytest.fixture(scope="module")
def team_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TeamServer]:
    server = TeamServer(tmp_path_factory.mktemp("team-server"))
    try:
        server.start()
        yield server
    finally:
        server.kill()
        server.drop_database()


@pytest.fixture
def on_server(team_server: TeamServer, monkeypatch: pytest.MonkeyPatch) -> TeamServer:
    """This process and the jobs it starts log to the team server."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_server.url)
    mlflow.set_tracking_uri(team_server.url)
    if not team_server.healthy():  # a test before this one left it down
        team_server.start()
    return team_server


def _wait_until(done: Callable[[], bool], proc: subprocess.Popen, timeout_s: float,
                never: Callable[[], str]) -> float:
    """Wait until ``done()`` while ``proc`` runs; the monotonic time it came true."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert proc.poll() is None or done(), output(proc)
        assert time.monotonic() < deadline, never()
        time.sleep(0.2)
    return time.monotonic()


def wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 900) -> float:
    """Wait until ``path`` exists while ``proc`` runs; the monotonic time it appeared."""
    return _wait_until(path.exists, proc, timeout_s, lambda: f"{path.name} never appeared")


def wait_for_output(text: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    """Wait until ``proc``'s output says ``text`` while it runs."""
    _wait_until(lambda: text in proc.log_path.read_text(), proc, timeout_s,
                lambda: f"never said {text!r}: {output(proc)}")


def test_training_goes_on_through_a_server_crash_and_logs_every_epoch(on_server, tmp_path):
    out = tmp_path / "out"
    flags = tiny_train_flags(out, epochs=EPOCHS, checkpoint_freq=1)
    args = [a for k, v in flags.items() for a in (f"--{k}", str(v))]
    job = start([sys.executable, "-m", "atari_vae", "train", *args], tmp_path)

    down_at = wait_for(out / "checkpoint_epoch_2.pt", job)
    on_server.kill()
    wait_for(out / "checkpoint_epoch_4.pt", job)  # training went on without the server
    # MLflow's own HTTP retries (a few seconds) outlast a fast restart, so the server stays
    # down until the job has seen the outage and held points back.
    wait_for_output("tracking store unreachable", job)
    on_server.start()
    back_at = time.monotonic()
    finish(job)

    assert all((out / f"checkpoint_epoch_{e}.pt").is_file() for e in range(1, EPOCHS + 1))
    client = mlflow.MlflowClient()
    run = client.get_run((out / "mlflow_run_id.txt").read_text().strip())
    assert run.info.status == "FINISHED", output(job)
    for key in ("train/loss", "val/loss", "val/psnr", "val/fg_accuracy"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), (key, steps)
    images = {a.path for a in client.list_artifacts(run.info.run_id, "reconstructions")}
    assert images == {f"reconstructions/reconstructions_epoch_{e}.png"
                      for e in range(1, EPOCHS + 1)}
    assert int(run.data.tags["tracking_retried_points"]) > 0
    assert "tracking store back after" in output(job)
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id='{run.info.run_id}'", output_format="list")
    (model,) = [m for m in models if str(m.status) == "READY"]
    assert model.name == "breakout"
    assert {m.key for m in model.metrics} >= {"val_best/psnr", "val_best/fg_accuracy"}
    print(f"\nserver down {back_at - down_at:.1f} s (kill to healthy again); run tags: "
          f"{run.data.tags['tracking_retried_points']} metric points retried, outage seen by "
          f"the job {run.data.tags['tracking_outage_s']} s")


@pytest.fixture
def study_name() -> Iterator[str]:
    name = f"pytest-team-{uuid.uuid4().hex[:10]}"
    yield name
    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name=name, storage=DB)


def test_two_tune_workers_register_a_champion_that_another_process_loads(
        on_server, tmp_path, study_name):
    # Each trial trains the quick-test recipe, so the best one passes the quality floor.
    recipe = {k: v for k, v in GOOD_TRAINING.items() if k != "latent_dim"}
    workers = [start(tune_command(tmp_path / "out", study_name, n_trials=1, latent_dim_min=8,
                                  latent_dim_max=8, kl_weight_min=0.05, kl_weight_max=0.2,
                                  **recipe), tmp_path)
               for _ in range(2)]
    for worker in workers:
        finish(worker)

    trials = optuna.load_study(study_name=study_name, storage=DB).trials
    assert len(trials) == 2 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias(study_name, "champion")
    trial_run = client.get_run(champion.run_id)
    assert trial_run.data.tags["optuna_trial"] in {"0", "1"}  # an int tag, sent as a string

    code = ("import atari_vae, torch\n"
            f"vae = atari_vae.load_registered({study_name!r})\n"
            "print('latent', vae.encode(torch.zeros(1, 3, 64, 64))[0].shape[1])\n")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    latent = next(t.params["latent_dim"] for t in trials
                  if t.user_attrs["mlflow_run_id"] == champion.run_id)
    assert f"latent {latent}" in loaded.stdout
    assert "%|" not in loaded.stderr  # no download progress bar in a job's log


def test_tags_that_many_workers_set_at_once_all_land_without_an_error(on_server):
    # Two tune workers once set the same new version tag at the same moment and one died of
    # PostgreSQL's duplicate key; a tag write must take that race, whoever inserts first.
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier

    from atari_vae import tracking

    client = mlflow.MlflowClient()
    name = f"race-{uuid.uuid4().hex[:8]}"
    client.create_registered_model(name)
    with mlflow.start_run() as run:
        pass
    version = client.create_model_version(name, source=f"{run.info.artifact_uri}/model",
                                          run_id=run.info.run_id).version
    keys, writers = [f"k{i}" for i in range(6)], 8
    barrier = Barrier(writers)

    def write(worker: int) -> None:
        own = mlflow.MlflowClient()
        for key in keys:
            barrier.wait(timeout=120)
            try:
                tracking.set_version_tags(own, name, version, {key: f"w{worker}"})
            except Exception:
                barrier.abort()  # the others stop waiting for this writer
                raise

    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(write, range(writers)))  # re-raises a writer's error
    tags = client.get_model_version(name, version).tags
    assert set(keys) <= set(tags) and all(tags[k].startswith("w") for k in keys)
