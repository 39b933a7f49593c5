"""Checks of flag values: each raises one ConfigError naming the flag, its value and the rule.

``config.py`` says what the flags and their defaults are; this module says what values they
accept, so each job's ``validate()`` reads as a list of rules.
"""

from __future__ import annotations

import math
import re
from typing import Any

from atari_vae.errors import ConfigError

MAX_EXPERIMENT_NAME_LENGTH = 500  # MLflow's limit (mlflow.utils.validation)
MODEL_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"


def positive(cfg: Any, *names: str) -> None:
    """Each named flag is a finite number > 0."""
    for name in names:
        value = finite(cfg, name)
        if not value > 0:
            raise ConfigError(f"--{name} must be positive, got {value}")


def non_negative(cfg: Any, *names: str) -> None:
    """Each named flag is a finite number >= 0."""
    for name in names:
        value = finite(cfg, name)
        if not value >= 0:
            raise ConfigError(f"--{name} must be zero or positive, got {value}")


def finite(cfg: Any, name: str) -> Any:
    """The flag's value; inf and nan are refused (click's FLOAT parses both)."""
    value = getattr(cfg, name)
    if not math.isfinite(value):
        raise ConfigError(f"--{name} must be a finite number, got {value}")
    return value


def one_of(cfg: Any, name: str, allowed: tuple[str, ...], prefix: bool = False) -> None:
    """The flag is one of ``allowed``; with ``prefix``, only the part before ':' (cuda:1)."""
    value = getattr(cfg, name)
    base = value.split(":")[0] if prefix else value
    if base not in allowed:
        raise ConfigError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")


def experiment_name(cfg: Any) -> None:
    """A non-empty MLflow experiment name within MLflow's length limit."""
    # An empty name would log into MLflow's "Default" experiment without a word.
    name = cfg.experiment_name
    if not name.strip():
        raise ConfigError(f"--experiment_name must not be empty, got {name!r}")
    if len(name) > MAX_EXPERIMENT_NAME_LENGTH:
        raise ConfigError(f"--experiment_name may have at most {MAX_EXPERIMENT_NAME_LENGTH} "
                          f"characters, got {len(name)}")


def model_name(name: str) -> None:
    """A ConfigError unless ``name`` is empty (the default) or a registry name we allow."""
    if name and not re.fullmatch(MODEL_NAME_PATTERN, name):
        raise ConfigError(f"--model_name {name!r} is not allowed: use 1-100 letters, digits, "
                          f"'.', '_' or '-', starting with a letter or digit")


def collect_policy(cfg: Any) -> None:
    """--collect_policy is random or a registered controller's URI; --policy_mix a share."""
    if not 0.0 <= cfg.policy_mix <= 1.0:
        raise ConfigError(f"--policy_mix must be in [0, 1], got {cfg.policy_mix}")
    policy = cfg.collect_policy
    if policy == "random":
        return
    if not re.fullmatch(rf"models:/{MODEL_NAME_PATTERN}(@[A-Za-z0-9_-]+|/[0-9]+)", policy):
        raise ConfigError(f"--collect_policy must be random, models:/<name>@<alias> or "
                          f"models:/<name>/<version>, got {policy!r}")
    if "," in cfg.env_name:
        raise ConfigError("--collect_policy with a controller takes one game (a controller "
                          "plays the game it was trained on)")
