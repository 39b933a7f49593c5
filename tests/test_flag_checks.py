"""The value rules every job's validate() is built from: one line naming flag, value and rule."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from atari_vae import flag_checks as check
from atari_vae.errors import ConfigError


def _message(rule, *args) -> str:
    with pytest.raises(ConfigError) as err:
        rule(*args)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_numbers_are_refused_before_their_sign_is_read(value):
    cfg = SimpleNamespace(lr=value)
    assert "--lr must be a finite number" in _message(check.positive, cfg, "lr")
    assert "--lr must be a finite number" in _message(check.non_negative, cfg, "lr")


def test_positive_refuses_zero_and_non_negative_accepts_it():
    cfg = SimpleNamespace(a=1, b=0)
    check.non_negative(cfg, "a", "b")
    assert _message(check.positive, cfg, "a", "b") == "--b must be positive, got 0"
    assert "zero or positive, got -1" in _message(check.non_negative, SimpleNamespace(c=-1), "c")


def test_one_of_lists_the_allowed_values_and_with_prefix_reads_only_the_device_kind():
    check.one_of(SimpleNamespace(device="cuda:1"), "device", ("cpu", "cuda"), prefix=True)
    message = _message(check.one_of, SimpleNamespace(device="cuda:1"), "device", ("cpu", "cuda"))
    assert message == "--device must be one of cpu, cuda, got 'cuda:1'"


def test_the_experiment_name_limit_is_mlflows():
    from mlflow.utils.validation import MAX_EXPERIMENT_NAME_LENGTH

    assert check.MAX_EXPERIMENT_NAME_LENGTH == MAX_EXPERIMENT_NAME_LENGTH
    check.experiment_name(SimpleNamespace(experiment_name="x" * MAX_EXPERIMENT_NAME_LENGTH))
    too_long = SimpleNamespace(experiment_name="x" * (MAX_EXPERIMENT_NAME_LENGTH + 1))
    assert "at most 500 characters" in _message(check.experiment_name, too_long)


@pytest.mark.parametrize("name", ["", "atari-vae-breakout", "a.b_c-1"])
def test_registry_names_of_letters_digits_dot_underscore_dash_pass(name):
    check.model_name(name)


@pytest.mark.parametrize("name", ["-leading-dash", "has space", "quote'd", "x" * 101])
def test_other_registry_names_are_refused(name):
    assert "--model_name" in _message(check.model_name, name)


@pytest.mark.parametrize("policy", ["random", "models:/ctl@champion", "models:/ctl/3"])
def test_collect_policy_is_random_or_a_registered_controller(policy):
    check.collect_policy(SimpleNamespace(collect_policy=policy, policy_mix=0.5,
                                         env_name="Breakout"))


@pytest.mark.parametrize("policy, mix, env_name, fragment", [
    ("runs:/abc/ctl", 0.5, "Breakout", "--collect_policy must be random"),
    ("models:/ctl@champion", 1.5, "Breakout", "--policy_mix must be in [0, 1]"),
    ("models:/ctl@champion", 0.5, "Breakout,Pong", "takes one game"),
])
def test_collect_policy_refusals_say_what_is_allowed(policy, mix, env_name, fragment):
    cfg = SimpleNamespace(collect_policy=policy, policy_mix=mix, env_name=env_name)
    assert fragment in _message(check.collect_policy, cfg)
