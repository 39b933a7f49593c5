"""Config dataclasses: the issue's defaults, and every bad value rejected with a clear message."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from atari_vae.cli import friendly_errors
from atari_vae.config import EvaluateConfig, PlanConfig, TrainConfig, TuneConfig, fields_of
from atari_vae.errors import ConfigError

# The training issue's defaults. kl_weight (1.0 there) and lr (1e-3 there) are not pinned: the
# quality issue asks for the best values found, and docs/results.md says why ("The learning
# rate").
# num_episodes (100 there) and epochs (100) became 300 episodes and a 2000-step budget when
# the time-to-quality issue measured both better and 4x faster (docs/results.md, "Default
# settings"); batch_size (128 there) became 64 at twice the steps, the same passes, when that
# measured better on all three games (docs/results.md, "Batch 64"); train_steps 0 sizes each
# game's run by its own budget (8000, SpaceInvaders 16000: test_schedule).
ISSUE_TRAIN_DEFAULTS = dict(
    env_name="Breakout", latent_dim=32, num_episodes=300, max_steps=1000, batch_size=64,
    epochs=0, train_steps=0, base_channels=16, val_split=0.1, device="auto",
    output_dir="outputs/vae_training", checkpoint_freq=10, seed=42)


def test_train_defaults_are_the_issues_with_the_measured_budget():
    cfg = TrainConfig()
    assert {k: getattr(cfg, k) for k in ISSUE_TRAIN_DEFAULTS} == ISSUE_TRAIN_DEFAULTS


def _readme_training_flag_defaults() -> dict[str, str]:
    """The README's "Training flags" table: flag name -> its default column, as written."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme.split("### Training flags", 1)[1].split("\n\n", 2)[1]
    return {m[1]: m[2] for m in re.finditer(r"^\| `--(\w+)` \| ([^|]+?) \|", table, re.M)}


def test_readme_training_flags_table_lists_every_flag_with_its_default():
    shown = _readme_training_flag_defaults()
    defaults = {f.name: getattr(TrainConfig(), f.name) for f in fields_of(TrainConfig)}
    assert shown.keys() == defaults.keys()
    for name, value in defaults.items():
        if isinstance(value, bool):
            assert shown[name] == ("on" if value else "off"), name
        elif isinstance(value, (int, float)):
            assert float(shown[name]) == value, name
        else:
            assert shown[name] == value, name


def test_evaluate_seed_differs_from_the_training_seed():
    assert EvaluateConfig().seed != TrainConfig().seed


@pytest.mark.parametrize("config_cls", [TrainConfig, EvaluateConfig, TuneConfig, PlanConfig])
def test_default_configs_are_valid(config_cls):
    config_cls().validate()


@pytest.mark.parametrize("config_cls", [TrainConfig, EvaluateConfig, TuneConfig, PlanConfig])
def test_every_field_has_help_text_for_cli_and_readme(config_cls):
    for f in fields_of(config_cls):
        assert len(f.metadata["help"]) > 10, f.name


@pytest.mark.parametrize("field, value, fragment", [
    ("num_episodes", 0, "positive"),
    ("num_episodes", 1, "at least 2"),
    ("max_steps", 0, "positive"),
    ("latent_dim", 0, "positive"),
    ("latent_dim", -4, "positive"),
    ("batch_size", 0, "positive"),
    ("epochs", -1, "zero or positive"),
    ("train_steps", -1, "zero or positive"),
    ("checkpoint_freq", 0, "positive"),
    ("lr", 0.0, "positive"),
    ("lr", -1e-3, "positive"),
    ("lr", math.nan, "finite"),
    ("lr", math.inf, "finite"),
    ("kl_weight", math.inf, "finite"),
    ("cuda_graph", "on", "--cuda_graph must be one of auto, off, got 'on'"),
    ("kl_weight", -1.0, "zero or positive"),
    ("free_bits", -0.5, "zero or positive"),
    ("fg_weight", 0.0, "positive"),
    ("val_split", 0.0, "(0, 1)"),
    ("val_split", 1.0, "(0, 1)"),
    ("val_split", 1.5, "(0, 1)"),
    ("val_split", -0.1, "(0, 1)"),
    ("val_split", math.nan, "(0, 1)"),
    ("device", "tpu", "auto, cpu, cuda, mps"),
    ("precision", "fp16", "auto, fp32, bf16"),
])
def test_bad_train_value_is_a_config_error_naming_flag_value_and_rule(field, value, fragment):
    cfg = TrainConfig(**{field: value})
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    message = str(err.value)
    assert f"--{field}" in message and fragment in message and str(value) in message
    assert "\n" not in message


@pytest.mark.parametrize("field, value", [("num_samples", 0), ("max_steps", -1),
                                          ("device", "gpu")])
def test_bad_evaluate_value_is_a_config_error(field, value):
    with pytest.raises(ConfigError, match=f"--{field}"):
        EvaluateConfig(**{field: value}).validate()


@pytest.mark.parametrize("overrides, flag", [
    (dict(n_trials=0), "--n_trials"),
    (dict(n_trials=-1), "--n_trials"),
    (dict(kl_weight_min=1.0, kl_weight_max=0.1), "--kl_weight_min"),
    (dict(latent_dim_min=64, latent_dim_max=8), "--latent_dim_min"),
    (dict(epochs=0), "--epochs"),
])
def test_bad_tune_value_is_a_config_error(overrides, flag):
    with pytest.raises(ConfigError, match=flag):
        TuneConfig(**overrides).validate()


def test_config_errors_are_printed_by_the_cli_as_one_line_and_exit_1(capsys):
    @friendly_errors
    def job() -> None:
        TrainConfig(lr=-1e-3).validate()

    with pytest.raises(SystemExit) as exited:
        job()
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: --lr") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
