"""The CLI: options generated from the configs, the original flags, bad input as one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from atari_vae import cli
from atari_vae.config import EvaluateConfig, PlanConfig, TrainConfig, TuneConfig, fields_of
from atari_vae.data import cache_dir, cache_key
from atari_vae.envs import resolve_game
from atari_vae.store import FRAMES_FILE, INDEX_FILE, FrameStore
from tests.conftest import REPO, tiny_train_flags

COMMANDS = [("train", TrainConfig), ("evaluate", EvaluateConfig), ("tune", TuneConfig),
            ("plan", PlanConfig)]
ORIGINAL_TRAIN_FLAGS = ("--env_name", "--latent_dim", "--num_episodes", "--max_steps",
                        "--batch_size", "--epochs", "--lr", "--val_split", "--device",
                        "--output_dir", "--checkpoint_freq", "--seed")
ORIGINAL_EVALUATE_FLAGS = ("--model_path", "--env_name", "--num_samples", "--output_dir",
                           "--seed", "--device")


def _options(command: click.Command) -> dict[str, click.Option]:
    return {p.name: p for p in command.params if isinstance(p, click.Option)}


@pytest.mark.parametrize("name, config_cls", COMMANDS)
def test_every_config_field_is_an_option_of_its_command_with_the_same_default(name, config_cls):
    options = _options(cli.main.commands[name])
    fields = fields_of(config_cls)
    assert set(options) == {f.name for f in fields}
    for f in fields:
        option = options[f.name]
        assert f"--{f.name}" in option.opts, f.name
        assert option.default == f.default, f.name
        if f.metadata["choices"] and f.name != "device":  # device also takes cuda:N
            assert tuple(option.type.choices) == f.metadata["choices"]


def test_hyphen_aliases_parse_to_the_same_config_fields():
    ctx = cli.train.make_context("train", ["--env-name", "Pong", "--num-episodes", "3",
                                           "--val-split", "0.25", "--resume"])
    cfg = TrainConfig(**ctx.params)
    assert (cfg.env_name, cfg.num_episodes, cfg.val_split, cfg.resume) == ("Pong", 3, 0.25, True)


def _help(*command: str) -> str:
    result = subprocess.run([sys.executable, *command, "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_original_training_script_help_lists_the_original_flags():
    text = _help("experiments/train_atari_vae.py")
    assert "train_atari_vae.py" in text
    for flag in ORIGINAL_TRAIN_FLAGS:
        assert flag in text, flag


def test_original_evaluation_script_help_lists_the_original_flags():
    text = _help("experiments/evaluate_vae.py")
    assert "evaluate_vae.py" in text
    for flag in ORIGINAL_EVALUATE_FLAGS:
        assert flag in text, flag


def test_python_dash_m_offers_train_evaluate_and_tune():
    text = _help("-m", "atari_vae")
    for command in ("train", "evaluate", "tune"):
        assert command in text


def test_train_help_says_what_loss_reduction_kl_weight_scales():
    help_text = CliRunner().invoke(cli.train, ["--help"]).output
    assert "--kl_weight" in help_text and "SUM" in help_text


def _train_args(out: Path, **overrides: object) -> list[str]:
    args = []
    for key, value in tiny_train_flags(out, **overrides).items():
        if value is True:
            args.append(f"--{key}")
        elif value is not False:
            args += [f"--{key}", str(value)]
    return args


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


BAD_TRAIN_INPUT = [
    (dict(env_name="Breakot"), "unknown game 'Breakot'; did you mean breakout"),
    (dict(env_name="NoSuchGame"), "unknown game 'NoSuchGame'"),
    (dict(num_episodes=0), "--num_episodes must be positive"),
    (dict(num_episodes=1), "--num_episodes must be at least 2"),
    (dict(epochs=-3), "--epochs must be zero or positive"),
    (dict(train_steps=-1), "--train_steps must be zero or positive"),
    (dict(batch_size=0), "--batch_size must be positive"),
    (dict(latent_dim=0), "--latent_dim must be positive"),
    (dict(max_steps=0), "--max_steps must be positive"),
    (dict(checkpoint_freq=0), "--checkpoint_freq must be positive"),
    (dict(object_oversample=0), "--object_oversample must be positive"),
    (dict(object_oversample="inf"), "--object_oversample must be a finite number, got inf"),
    (dict(lr="inf"), "--lr must be a finite number, got inf"),
    (dict(fg_weight="nan"), "--fg_weight must be a finite number, got nan"),
    (dict(kl_weight="inf"), "--kl_weight must be a finite number, got inf"),
    (dict(val_split=0), "--val_split must be in (0, 1)"),
    (dict(val_split=1.5), "--val_split must be in (0, 1)"),
    (dict(lr=-0.001), "--lr must be positive"),
    (dict(kl_weight=-1), "--kl_weight must be zero or positive"),
    (dict(weight_decay=-0.1), "--weight_decay must be zero or positive"),
    (dict(device="cuda"), "--device cuda: CUDA is not available"),
    (dict(device="cuda:1"), "--device cuda:1: CUDA is not available"),
    (dict(device="tpu"), "--device must be one of"),
    (dict(resume=True), "--resume: no checkpoint_epoch_*.pt"),
    (dict(experiment_name=""), "--experiment_name must not be empty"),
    (dict(experiment_name=" "), "--experiment_name must not be empty"),
    (dict(experiment_name="x" * 501), "--experiment_name may have at most 500 characters"),
]


@pytest.mark.parametrize("overrides, message", BAD_TRAIN_INPUT,
                         ids=[next(iter(o)) + "=" + str(next(iter(o.values())))[:20]
                              for o, _ in BAD_TRAIN_INPUT])
def test_bad_train_input_gives_one_error_line_nonzero_exit_and_no_files(tmp_path, overrides,
                                                                        message):
    before = _files_under(tmp_path)
    result = CliRunner().invoke(cli.train, _train_args(tmp_path / "out", **overrides))
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # handled, not a crash
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines
    assert "Traceback" not in result.output
    assert _files_under(tmp_path) == before
    assert not (tmp_path / "mlflow.db").exists()


def test_output_dir_that_is_a_file_is_refused_and_left_untouched(tmp_path):
    target = tmp_path / "taken"
    target.write_text("someone's notes")
    result = CliRunner().invoke(cli.train, _train_args(target))
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: --output_dir {target} is a file; give a directory"
    assert target.read_text() == "someone's notes"
    assert not (tmp_path / "mlflow.db").exists()


def test_unwritable_output_dir_is_refused(tmp_path):
    if os.geteuid() == 0:
        # root writes anywhere; a dir below a file is unwritable for everyone
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        out = tmp_path / "ro" / "out"
    result = CliRunner().invoke(cli.train, _train_args(out))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: --output_dir {out}")
    assert len(result.stderr.strip().splitlines()) == 1


def test_malformed_number_is_a_usage_error_without_traceback(tmp_path):
    result = CliRunner().invoke(cli.train, [*_train_args(tmp_path / "out"), "--epochs", "ten"])
    assert result.exit_code == 2
    assert "Error: Invalid value for '--epochs'" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_unreachable_tracking_server_fails_fast_naming_the_uri(tmp_path):
    uri = "http://127.0.0.1:9"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    result = subprocess.run([sys.executable, "-m", "atari_vae", "train",
                             *_train_args(tmp_path / "out")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and uri in lines[0], lines
    assert "Traceback" not in result.stderr
    assert not _files_under(tmp_path)  # no run, no frames, no model files


def test_unknown_game_through_the_installed_command_prints_only_the_error(tmp_path):
    exe = Path(sys.executable).with_name("atari-vae")
    result = subprocess.run([str(exe), "train", "--env_name", "spaceinvader", "--output_dir",
                             str(tmp_path / "out")], cwd=tmp_path, capture_output=True,
                            text=True, timeout=90)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("Error: unknown game 'spaceinvader'; did you mean "
                                    "space_invaders")
    assert not _files_under(tmp_path)  # no MLflow store, no output dir files


def test_tune_has_no_resume_flag_because_a_study_continues_from_its_storage():
    result = CliRunner().invoke(cli.main, ["tune", "--resume"])
    assert result.exit_code == 2 and "No such option '--resume'" in result.output
    assert "resume" in {f.name for f in fields_of(TrainConfig)}


def test_evaluate_refuses_an_empty_experiment_name_before_any_work(tmp_path):
    result = CliRunner().invoke(cli.evaluate, ["--experiment_name", "", "--output_dir",
                                               str(tmp_path / "eval")])
    assert result.exit_code == 1
    assert result.stderr == "Error: --experiment_name must not be empty, got ''\n"
    assert not _files_under(tmp_path)


def test_an_empty_frame_store_is_collected_again_instead_of_aborting_the_run(
        tmp_path, monkeypatch, caplog):
    # Zero-byte files, as a full disk leaves them; an empty .npz once ended runs in "Aborted!".
    monkeypatch.setenv("ATARI_VAE_CACHE_DIR", str(tmp_path / "cache"))
    cfg = TrainConfig(**tiny_train_flags(tmp_path / "out", epochs=1))  # what the run collects
    key = cache_key(resolve_game(cfg.env_name), cfg.num_episodes, cfg.max_steps, cfg.seed)
    store = cache_dir() / key
    store.mkdir(parents=True)
    for name in (INDEX_FILE, FRAMES_FILE):
        (store / name).write_bytes(b"")
    result = CliRunner().invoke(cli.train, _train_args(tmp_path / "out", epochs=1))
    assert result.exit_code == 0, result.output
    assert "Aborted" not in result.output
    assert any(r.getMessage().startswith(f"ignoring unreadable frame store {store}")
               for r in caplog.records)
    assert FrameStore.open(store, key).complete



def _import_error(cause: BaseException | None) -> ImportError:
    exc = ImportError("initialization failed")
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize("exit_code", [0, 1])
def test_a_command_turns_sigterm_into_an_interrupt_and_gives_back_the_callers_handler(exit_code):
    def callers_handler(signum, frame):
        pass

    seen_during = []

    @click.command()
    @cli.friendly_errors
    def job() -> None:
        seen_during.append(signal.getsignal(signal.SIGTERM))
        if exit_code:
            raise cli.AtariVaeError("bad input")

    before = signal.signal(signal.SIGTERM, callers_handler)
    try:
        assert CliRunner().invoke(job, []).exit_code == exit_code
        assert seen_during == [cli._interrupted]
        assert signal.getsignal(signal.SIGTERM) is callers_handler
    finally:
        signal.signal(signal.SIGTERM, before)


# A SIGTERM that lands while matplotlib initialises its Agg backend reaches the command as
# "ImportError: initialization failed", caused by the KeyboardInterrupt the handler raised.
@pytest.mark.parametrize("raised, exit_code, status", [
    (_import_error(KeyboardInterrupt("signal 15")), 130, "KILLED"),
    (_import_error(None), 1, "FAILED")], ids=["caused-by-an-interrupt", "a-real-import-error"])
def test_an_interrupt_behind_another_error_ends_the_run_killed_and_any_other_failed(
        raised, exit_code, status):
    from mlflow import MlflowClient

    from atari_vae import tracking

    run_ids = []

    @click.command()
    @cli.friendly_errors
    def plots() -> None:
        tracking.configure("interrupts")
        with tracking.tracked_run("plots") as run:
            run_ids.append(run.info.run_id)
            raise raised

    result = CliRunner().invoke(plots, [])
    assert result.exit_code == exit_code
    assert MlflowClient().get_run(run_ids[0]).info.status == status
    if status == "KILLED":
        assert result.stderr.strip() == ("Interrupted; the MLflow run is marked KILLED. "
                                         "Resume with --resume.")
    else:
        assert result.exception is raised  # raised on: a traceback for a real bug
