"""How long and how fast a run trains: its number of epochs and its learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from atari_vae.config import TRAIN_STEPS_BY_GAME, TRAIN_STEPS_OTHER_GAMES, TrainConfig
from atari_vae.data import FrameSet, epoch_length
from atari_vae.envs import parse_games

MIN_LR_FACTOR = 0.05


def planned(cfg: TrainConfig, train_set: FrameSet, saved_epochs: int | None = None) -> TrainConfig:
    """``cfg`` with ``--epochs 0`` made a number: the checkpoint's on resume, else the whole
    passes over ``train_set`` that reach the run's step budget."""
    if cfg.epochs:
        return cfg
    if saved_epochs:
        return dataclasses.replace(cfg, epochs=saved_epochs)
    per_epoch = steps_per_epoch(train_set, cfg.batch_size)
    return dataclasses.replace(cfg, epochs=max(1, math.ceil(step_budget(cfg) / per_epoch)))


def step_budget(cfg: TrainConfig) -> int:
    """``--train_steps``, or for 0 the largest of its games' budgets (``TRAIN_STEPS_BY_GAME``)."""
    if cfg.train_steps:
        return cfg.train_steps
    return max(TRAIN_STEPS_BY_GAME.get(game.title, TRAIN_STEPS_OTHER_GAMES)
               for game in parse_games(cfg.env_name))


def steps_per_epoch(train_set: FrameSet, batch_size: int) -> int:
    """Optimizer steps in one epoch (``data.epoch_length`` frames, the last batch partial)."""
    return math.ceil(epoch_length(train_set.game_ids) / batch_size)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Share of ``--lr`` at an optimizer step: linear warm-up, cosine decay to 5 %, then 5 %.

    The warm-up (one epoch, at most a tenth of the run) keeps the first Adam steps at a high
    learning rate from blowing up the loss (seen at 4e-3 without it: a 20x first-epoch loss).
    """
    warmup = max(1, min(warmup_steps, total_steps // 10))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return MIN_LR_FACTOR + (1 - MIN_LR_FACTOR) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule_epochs(ckpt: dict[str, Any]) -> int:
    """The --epochs a checkpoint's learning-rate schedule was laid out for."""
    return ckpt.get("schedule_epochs", ckpt["config"]["epochs"])
