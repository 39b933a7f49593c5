"""The epoch plan of a step budget and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from atari_vae.config import TrainConfig
from atari_vae.data import FrameSet
from atari_vae.schedule import lr_factor, planned, step_budget


def _frames(n: int, games: int = 1) -> FrameSet:
    ids = torch.arange(n) % games
    return FrameSet(torch.zeros(n, 3, 64, 64, dtype=torch.uint8), torch.arange(n),
                    torch.zeros(n, dtype=torch.int64), ids, tuple(f"g{i}" for i in range(games)))


@pytest.mark.parametrize("frames, train_steps, epochs", [  # batch 128
    (51_630, 2000, 5),  # Breakout's 300 default episodes: 404 steps a pass
    (225_000, 2000, 2),  # Pong's: 1758 steps a pass, so two passes reach the budget
    (1_000, 2000, 250),  # 8 steps a pass
    (500_000, 2000, 1),  # one pass is more than the budget: never zero passes
])
def test_epochs_0_plans_the_fewest_whole_passes_that_reach_the_step_budget(frames, train_steps,
                                                                          epochs):
    cfg = planned(TrainConfig(epochs=0, train_steps=train_steps, batch_size=128), _frames(frames))
    assert cfg.epochs == epochs


def test_a_given_epochs_is_kept_and_a_resume_keeps_the_saved_plan():
    assert planned(TrainConfig(epochs=7), _frames(51_630)).epochs == 7
    assert planned(TrainConfig(epochs=0), _frames(51_630), saved_epochs=9).epochs == 9


def test_a_mix_plans_on_the_frames_of_all_its_games_together():
    assert planned(TrainConfig(epochs=0, train_steps=100, batch_size=10),
                   _frames(300, games=3)).epochs == 4


@pytest.mark.parametrize("env_name, steps, passes", [  # 2,170 steps a pass at batch 64
    ("Breakout", 8000, 4),
    ("pong", 8000, 4),
    ("space_invaders", 16000, 8),  # its shots and score display need twice the steps
    ("ALE/SpaceInvaders-v5", 16000, 8),
    ("Breakout,SpaceInvaders", 16000, 8),  # a mix: the largest of its games' budgets
])
def test_train_steps_0_sizes_the_run_by_the_games_budget(env_name, steps, passes):
    assert step_budget(TrainConfig(env_name=env_name)) == steps
    assert step_budget(TrainConfig(env_name=env_name, train_steps=123)) == 123
    assert planned(TrainConfig(env_name=env_name, batch_size=64), _frames(138_880)).epochs == passes


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_five_percent():
    factors = [lr_factor(step, total_steps=1000, warmup_steps=50) for step in range(1000)]
    assert factors[0] == pytest.approx(1 / 50) and factors[49] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(factors[:49], factors[1:50], strict=True))
    assert all(a >= b for a, b in zip(factors[49:-1], factors[50:], strict=True))
    assert factors[500] == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 450 / 950)))
    assert factors[-1] == pytest.approx(0.05, abs=1e-4)


def test_warm_up_takes_at_most_a_tenth_of_a_short_run():
    # 3 epochs of 28 steps: a one-epoch warm-up would keep a third of the run below full speed.
    assert lr_factor(7, total_steps=84, warmup_steps=28) == pytest.approx(1.0)
