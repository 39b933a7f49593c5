"""The champion comparison: register a tuned model, score it and the current champion on the
same fixed fresh frames, and move the ``champion`` alias only if the new one wins.

The score is the tuning objective's measure (``metrics.balanced_psnr``) on ``eval_samples``
frames of new random-policy episodes from the evaluate job's default seed, so every study of a
game compares its models on the same frames.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from atari_vae import registry
from atari_vae.config import EvaluateConfig
from atari_vae.data import COLLECTOR_VERSION
from atari_vae.envs import Game
from atari_vae.metrics import balanced_psnr
from atari_vae.model import VAE

log = logging.getLogger(__name__)
EVAL_KEY_VERSION = 1  # bump when the measure changes, so old scores are not compared


class HeldOutScorer:
    """Balanced PSNR on fixed fresh frames (evaluate's default seed): the champion comparison."""

    def __init__(self, games: list[Game], num_samples: int) -> None:
        from atari_vae.evaluate import SCORED_FRAMES_PER_EPISODE

        self.games = games
        self.eval_cfg = EvaluateConfig(num_samples=num_samples, device="cpu")
        self._sets: dict[str, tuple[Any, ...]] = {}
        # Everything that picks the frames is in the key: scores on other frames never meet.
        self.key = (f"v{EVAL_KEY_VERSION} balanced_psnr {'+'.join(g.title for g in games)} "
                    f"seed={self.eval_cfg.seed} n={num_samples} "
                    f"max_steps={self.eval_cfg.max_steps} collector={COLLECTOR_VERSION} "
                    f"frames_per_episode={SCORED_FRAMES_PER_EPISODE}")

    def __call__(self, model: VAE) -> float:
        from atari_vae.evaluate import held_out_set, score_model

        scores = []
        for game in self.games:
            if game.title not in self._sets:  # the same frames score every version compared
                cfg = dataclasses.replace(self.eval_cfg, env_name=game.title)
                self._sets[game.title] = held_out_set(game, cfg)
            frames, mean_frame, background = self._sets[game.title]
            m = score_model(model, frames.frames_uint8, mean_frame, background)[0]
            scores.append(balanced_psnr(m["mse"], m["fg_mse"], m["fg_fraction"]))
        return sum(scores) / len(scores)


def register_candidate(model_uri: str, run_id: str, name: str, games: list[Game],
                       eval_samples: int, tags: dict[str, Any],
                       description: str) -> registry.ChampionDecision:
    """Register a logged model and give it ``champion`` only if it beats the current one."""
    version = registry.register_version(model_uri, name, run_id, tags, description)
    scorer = HeldOutScorer(games, eval_samples)
    decision = registry.promote_if_better(name, version, scorer, scorer.key)
    say = log.info if decision.moved else log.warning
    say("%s version %s %s champion: %s", name, version,
        "is" if decision.moved else "is registered but not", decision.reason)
    return decision
