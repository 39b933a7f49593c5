"""Never lose or mix runs: SIGKILL then --resume gives the uninterrupted weights; SIGTERM and
SIGHUP end KILLED; a directory holds one run, and --resume continues only that run, unchanged."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from atari_vae import cli
from atari_vae.checkpoints import resume_mismatch
from atari_vae.config import TrainConfig
from atari_vae.files import PARTIAL
from atari_vae.jobs import RUN_ID_FILE
from atari_vae.schedule import MIN_LR_FACTOR
from tests.conftest import tiny_train_flags
from tests.test_model import _Payload
from tests.test_train import cli_args

EXE = str(Path(sys.executable).with_name("atari-vae"))
POLL_S = 0.01


def _flags(out: Path, **overrides: object) -> dict[str, object]:
    # 4 epochs with a checkpoint each: the kill lands after epoch 2, the resume runs 3 and 4.
    base = dict(epochs=4, checkpoint_freq=1)
    return tiny_train_flags(out, **{**base, **overrides})


def _train(flags: dict[str, object], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([EXE, "train", *cli_args(flags)], cwd=cwd, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _start(flags: dict[str, object], cwd: Path) -> tuple[subprocess.Popen, Path]:
    """A training in the background and its stderr file (a full pipe would stall it)."""
    log = cwd / f"{Path(str(flags['output_dir'])).name}.stderr"
    with open(log, "w") as fh:
        proc = subprocess.Popen([EXE, "train", *cli_args(flags)], cwd=cwd, text=True,
                                stdout=subprocess.DEVNULL, stderr=fh)
    return proc, log


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"training ended before {path.name} appeared: {log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path.name} did not appear within {timeout_s} s")
        time.sleep(POLL_S)


def test_resume_after_sigkill_gives_the_uninterrupted_weights_and_the_same_mlflow_run(tmp_path):
    reference = _flags(tmp_path / "reference")
    _train(reference, tmp_path)

    out = tmp_path / "interrupted"
    proc, log = _start(_flags(out), tmp_path)
    _wait_for(out / "checkpoint_epoch_2.pt", proc, log)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final_model.pt").exists(), "the kill must land mid-training"
    run_id = (out / RUN_ID_FILE).read_text().strip()
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"  # SIGKILL cannot clean up
    for path in out.glob("[!.]*.pt"):  # atomic writes: every visible file is whole
        assert torch.load(path, weights_only=True), path.name

    _train({**_flags(out), "resume": True}, tmp_path)

    resumed = torch.load(out / "final_model.pt", weights_only=True)
    uninterrupted = torch.load(tmp_path / "reference" / "final_model.pt", weights_only=True)
    assert resumed.keys() == uninterrupted.keys()
    unequal = [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])]
    assert not unequal, f"resumed weights differ from the uninterrupted run in {unequal}"
    best = torch.load(out / "best_model.pt", weights_only=True)
    best_ref = torch.load(tmp_path / "reference" / "best_model.pt", weights_only=True)
    assert all(torch.equal(best[k], best_ref[k]) for k in best)

    assert (out / RUN_ID_FILE).read_text().strip() == run_id
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.info.run_id for r in runs) == sorted(
        [run_id, (tmp_path / "reference" / RUN_ID_FILE).read_text().strip()])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "val/loss")]
    assert {3, 4} <= set(steps) and len(steps) == len(set(steps))
    ckpt = torch.load(out / "checkpoint_epoch_4.pt", weights_only=True)
    assert [h["epoch"] for h in ckpt["history"]] == [1, 2, 3, 4]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_or_sighup_ends_the_mlflow_run_killed_and_says_how_to_resume(tmp_path, signum):
    out = tmp_path / "out"
    proc, log = _start(tiny_train_flags(out, epochs=200), tmp_path)
    _wait_for(out / "checkpoint_epoch_1.pt", proc, log)
    proc.send_signal(signum)
    proc.wait(timeout=120)
    stderr = log.read_text()
    assert proc.returncode == 130
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("Interrupted")
    assert "--resume" in stderr
    run = MlflowClient().get_run((out / RUN_ID_FILE).read_text().strip())
    assert run.info.status == "KILLED"


def test_resume_refuses_a_checkpoint_that_needs_unpickling_code(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "code-ran"
    torch.save({"model": _Payload(marker)}, out / "checkpoint_epoch_1.pt")
    result = CliRunner().invoke(cli.train, cli_args({**_flags(out), "resume": True}))
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: --resume: cannot restore {out / 'checkpoint_epoch_1.pt'}: not a tensor-only "
        f"torch file; pickled objects are never loaded\n")
    assert not marker.exists()
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run was opened


def test_resume_refuses_another_model_size_and_opens_a_new_run_if_the_old_one_is_gone(
        tmp_path, monkeypatch):
    out = tmp_path / "out"
    flags = tiny_train_flags(out, epochs=1, latent_dim=4)
    first = CliRunner().invoke(cli.train, cli_args(flags))
    assert first.exit_code == 0, first.output
    old_run_id = (out / RUN_ID_FILE).read_text().strip()

    wrong = CliRunner().invoke(cli.train, cli_args({**flags, "latent_dim": 8, "epochs": 2,
                                                    "resume": True}))
    assert wrong.exit_code == 1
    assert wrong.stderr.startswith("Error: --resume: cannot restore")
    assert "trained with --latent_dim 4, not 8" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1
    assert MlflowClient().get_run(old_run_id).info.status == "FINISHED"  # not reopened

    other_store = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other_store)
    moved = CliRunner().invoke(cli.train, cli_args({**flags, "epochs": 2, "resume": True}))
    assert moved.exit_code == 0, moved.output
    new_run = MlflowClient(other_store).get_run((out / RUN_ID_FILE).read_text().strip())
    assert new_run.info.run_id != old_run_id and new_run.info.status == "FINISHED"
    assert new_run.data.tags["resumed_from_run_id"] == old_run_id
    assert new_run.data.params["latent_dim"] == "4"
    assert torch.load(out / "checkpoint_epoch_2.pt", weights_only=True)["epoch"] == 2


def test_resume_refuses_other_data_flags_but_accepts_another_spelling_of_the_game(tmp_path):
    out = tmp_path / "out"
    flags = tiny_train_flags(out, epochs=1)
    assert CliRunner().invoke(cli.train, cli_args(flags)).exit_code == 0

    other_seed = CliRunner().invoke(cli.train, cli_args({**flags, "seed": 7, "epochs": 2,
                                                         "resume": True}))
    assert other_seed.exit_code == 1
    assert "trained with --seed 42, not 7" in other_seed.stderr
    assert len(other_seed.stderr.strip().splitlines()) == 1

    same_game = CliRunner().invoke(cli.train, cli_args({**flags, "env_name": "ALE/Breakout-v5",
                                                        "epochs": 2, "resume": True}))
    assert same_game.exit_code == 0, same_game.output
    assert torch.load(out / "checkpoint_epoch_2.pt", weights_only=True)["epoch"] == 2


def test_a_restart_removes_temporaries_that_a_killed_run_left_half_written(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".checkpoint_epoch_3.pt{PARTIAL}k2j4x9.pt"  # as atomic_path names them
    stale.write_bytes(b"half a checkpoint")
    keep = out / ".notes"
    keep.write_text("the user's own hidden file")
    assert CliRunner().invoke(cli.train, cli_args(tiny_train_flags(out, epochs=1))).exit_code == 0
    assert not stale.exists() and keep.read_text() == "the user's own hidden file"


def test_a_multi_game_run_resumes_but_not_from_a_checkpoint_of_the_mixed_background_loss(
        tmp_path):
    out = tmp_path / "out"
    flags = tiny_train_flags(out, epochs=1, env_name="Breakout,Pong")
    assert CliRunner().invoke(cli.train, cli_args(flags)).exit_code == 0
    resumed = CliRunner().invoke(cli.train, cli_args({**flags, "epochs": 2, "resume": True}))
    assert resumed.exit_code == 0, resumed.output

    old_style = out / "checkpoint_epoch_2.pt"  # as written before LOSS_VERSION existed
    ckpt = torch.load(old_style, weights_only=True)
    del ckpt["loss_version"]
    torch.save(ckpt, old_style)
    refused = CliRunner().invoke(cli.train, cli_args({**flags, "epochs": 3, "resume": True}))
    assert refused.exit_code == 1
    assert refused.stderr == (
        f"Error: --resume: cannot restore {old_style}: it was written before multi-game runs "
        f"weighed each game against its own background, so its losses are not comparable; "
        f"start a new run\n")


def _all_runs() -> list:
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _refused(flags: dict[str, object]) -> str:
    """The one error line of a train command that must be refused."""
    result = CliRunner().invoke(cli.train, cli_args(flags))
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    return lines[0]


def test_a_fresh_run_into_a_directory_that_holds_another_run_is_refused_and_changes_nothing(
        tmp_path):
    out = tmp_path / "out"
    flags = tiny_train_flags(out, epochs=1)
    assert CliRunner().invoke(cli.train, cli_args(flags)).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    line = _refused({**flags, "latent_dim": 4})
    assert line.startswith(f"Error: --output_dir {out} already holds a training run (")
    assert "continue it with --resume, or give another --output_dir" in line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert len(_all_runs()) == 1  # no second MLflow run was opened


def test_a_second_run_into_a_directory_in_use_is_refused_and_the_first_is_unharmed(tmp_path):
    out = tmp_path / "out"
    proc, log = _start(tiny_train_flags(out, epochs=200), tmp_path)
    try:
        _wait_for(out / "checkpoint_epoch_1.pt", proc, log)
        for resume in (False, True):
            line = _refused({**tiny_train_flags(out, latent_dim=4), "resume": resume})
            assert line == (f"Error: --output_dir {out} is in use by another training run; "
                            f"wait for it to end, or give another --output_dir")
        assert proc.poll() is None, "the first run must still be training"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    assert [r.info.run_id for r in _all_runs()] == [(out / RUN_ID_FILE).read_text().strip()]
    ckpt = torch.load(out / "checkpoint_epoch_1.pt", weights_only=True)
    assert ckpt["config"]["latent_dim"] == 8


def test_resume_continues_only_the_run_recorded_in_the_directory(tmp_path):
    # Run A went further; a newer-numbered checkpoint of A in B's directory is not B's.
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    assert CliRunner().invoke(cli.train, cli_args(tiny_train_flags(a_dir, epochs=2))).exit_code == 0
    b_flags = tiny_train_flags(b_dir, epochs=1)
    assert CliRunner().invoke(cli.train, cli_args(b_flags)).exit_code == 0
    b_run = (b_dir / RUN_ID_FILE).read_text().strip()
    (b_dir / "checkpoint_epoch_2.pt").write_bytes((a_dir / "checkpoint_epoch_2.pt").read_bytes())

    line = _refused({**b_flags, "epochs": 3, "resume": True})
    assert line == (f"Error: --resume: cannot restore {b_dir / 'checkpoint_epoch_2.pt'}: it "
                    f"belongs to another training run than the one this directory records; "
                    f"give another --output_dir for a new run")
    assert MlflowClient().get_run(b_run).info.status == "FINISHED"  # not reopened
    assert not (b_dir / "checkpoint_epoch_3.pt").exists()


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, frame_cache: Path) -> dict[str, object]:
    """The flags of one finished tiny run (fp32), shared by the flag-mismatch tests."""
    root = tmp_path_factory.mktemp("finished")
    flags = _flags(root / "out", epochs=2, precision="fp32")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "ATARI_VAE_CACHE_DIR": str(frame_cache)}
    result = subprocess.run([EXE, "train", *cli_args(flags)], cwd=root, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return flags


@pytest.mark.parametrize("flag, value, saved", [
    ("kl_weight", 0.5, 0.1), ("fg_weight", 1.0, 30.0), ("free_bits", 0.5, 0.0),
    ("lr", 0.001, 0.004), ("weight_decay", 0.01, 0.0), ("precision", "bf16", "fp32"),
    ("epochs", 1, 2)])
def test_resume_refuses_each_flag_that_changes_the_result_naming_it(finished, flag, value,
                                                                    saved):
    out = Path(str(finished["output_dir"]))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    line = _refused({**finished, "epochs": 3, flag: value, "resume": True})
    assert line.startswith(f"Error: --resume: cannot restore {out / 'checkpoint_epoch_2.pt'}: "
                           f"it was trained with --{flag} {saved}, not {value}")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert not Path("mlflow.db").exists()  # refused before any MLflow run


def test_a_checkpoint_older_than_base_channels_was_trained_32_wide():
    saved = {k: v for k, v in asdict(TrainConfig()).items() if k != "base_channels"}
    ckpt = {"run_token": "t", "config": saved}
    assert "--base_channels 32, not 16" in resume_mismatch(ckpt, TrainConfig(), "t")
    assert resume_mismatch(ckpt, TrainConfig(base_channels=32), "t") is None


@pytest.mark.parametrize("flag, value", [("object_oversample", 3.0), ("weight_decay", 0.01)])
def test_a_checkpoint_older_than_a_training_flag_trained_at_its_default(flag, value):
    saved = {k: v for k, v in asdict(TrainConfig()).items() if k != flag}
    ckpt = {"run_token": "t", "config": saved}
    default = getattr(TrainConfig, flag)
    assert f"--{flag} {default}, not {value}" in resume_mismatch(
        ckpt, TrainConfig(**{flag: value}), "t")
    assert resume_mismatch(ckpt, TrainConfig(), "t") is None


def test_a_checkpoint_older_than_a_loss_term_s_flag_trained_without_that_term():
    # --loc_weight's default is 30, --fourier_weight's 1 and --mask_weight's 10 today; a
    # checkpoint from before the flags trained without them
    saved = {k: v for k, v in asdict(TrainConfig()).items()
             if k not in ("loc_weight", "coord_weight", "fourier_weight", "mask_weight")}
    ckpt = {"run_token": "t", "config": saved}
    assert resume_mismatch(ckpt, TrainConfig(), "t") == (
        "it was trained with --loc_weight 0.0, not 30.0; resume with the run's original flags")
    before = dict(loc_weight=0.0, fourier_weight=0.0, mask_weight=0.0)
    assert resume_mismatch(ckpt, TrainConfig(**before), "t") is None
    assert "--coord_weight 0.0, not 30.0" in resume_mismatch(
        ckpt, TrainConfig(loc_weight=0.0, coord_weight=30.0), "t")
    assert "--fourier_weight 0.0, not 1.0" in resume_mismatch(
        ckpt, TrainConfig(loc_weight=0.0, mask_weight=0.0), "t")
    assert "--mask_weight 0.0, not 10.0" in resume_mismatch(
        ckpt, TrainConfig(loc_weight=0.0, fourier_weight=0.0, mask_weight=10.0), "t")


def test_a_larger_epochs_extends_the_run_at_the_final_rate_of_its_schedule(tmp_path):
    out = tmp_path / "out"
    flags = tiny_train_flags(out, epochs=2)
    assert CliRunner().invoke(cli.train, cli_args(flags)).exit_code == 0
    run_id = (out / RUN_ID_FILE).read_text().strip()
    extended = CliRunner().invoke(cli.train, cli_args({**flags, "epochs": 4, "resume": True}))
    assert extended.exit_code == 0, extended.output

    ckpt = torch.load(out / "checkpoint_epoch_4.pt", weights_only=True)
    lrs = [h["lr"] for h in ckpt["history"]]  # the rate after each epoch's last step
    end_rate = TrainConfig.lr * MIN_LR_FACTOR
    assert lrs[1:] == pytest.approx([end_rate] * 3, rel=1e-9)
    assert ckpt["schedule_epochs"] == 2
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and (out / RUN_ID_FILE).read_text().strip() == run_id
    assert run.data.params["epochs"] == "2" and run.data.tags["epochs_extended_to"] == "4"
    assert [m.step for m in MlflowClient().get_metric_history(run_id, "val/loss")] == [1, 2, 3, 4]


def test_epochs_0_trains_the_whole_passes_that_reach_train_steps_and_resumes_to_that_plan(
        tmp_path):
    out = tmp_path / "out"
    flags = tiny_train_flags(out, epochs=0, train_steps=7, batch_size=32)
    assert CliRunner().invoke(cli.train, cli_args(flags)).exit_code == 0
    run_id = (out / RUN_ID_FILE).read_text().strip()
    run = MlflowClient().get_run(run_id)
    steps_per_epoch = -(-int(run.data.metrics["data/n_train_frames"]) // 32)
    planned = -(-7 // steps_per_epoch)
    assert planned >= 2  # the budget spans several passes, so a plan of one pass would fail
    ckpt = torch.load(out / f"checkpoint_epoch_{planned}.pt", weights_only=True)
    assert [h["epoch"] for h in ckpt["history"]] == list(range(1, planned + 1))
    assert ckpt["config"]["epochs"] == planned  # the number, so a resume keeps the plan
    assert run.data.params["epochs"] == "0" and run.data.params["epochs_planned"] == str(planned)
    assert run.data.params["train_steps_planned"] == "7"

    again = CliRunner().invoke(cli.train, cli_args({**flags, "resume": True}))
    assert again.exit_code == 0, again.output
    assert not list(out.glob(f"checkpoint_epoch_{planned + 1}.pt"))
    assert "epochs_extended_to" not in MlflowClient().get_run(run_id).data.tags
