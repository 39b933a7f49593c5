"""CMA-ES over a linear controller on z, on game score; testing on fresh seeds. MLflow-free.

Generation g: every candidate plays the same ``episodes_per_candidate`` episodes, seeded
``seed + g * episodes_per_candidate + k``; its fitness is their mean score (pycma minimises, so
it is told the negative). Before the first generation, the features are standardised on
random-policy episodes seeded from ``seed + CALIBRATION_SEED_OFFSET``. The controller kept is
CMA-ES's distribution mean (``xfavorite``), less lucky than the best single candidate on a few
noisy episodes. Test episodes are seeded from ``seed + TEST_SEED_OFFSET`` on: never a training
seed (``PlanConfig.validate``). Every episode, of every policy, follows ``--serve``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from atari_vae.config import TEST_SEED_OFFSET, PlanConfig
from atari_vae.controller import LinearController, n_params, standardisation
from atari_vae.envs import fire_action
from atari_vae.rollout import (
    Actor,
    EnvPool,
    Episodes,
    FeatureRecorder,
    FixedActor,
    LatentActor,
    RandomActor,
    play,
)

log = logging.getLogger(__name__)
CALIBRATION_SEED_OFFSET = 2 * TEST_SEED_OFFSET  # apart from training and test seeds


class PlanHooks(Protocol):
    """Called after each generation with its scores (``score_mean``, ``score_best``, ...)."""

    def on_generation(self, generation: int, stats: dict[str, float]) -> None: ...


class NoHooks:
    def on_generation(self, generation: int, stats: dict[str, float]) -> None:
        pass


@dataclass
class Training:
    """A trained controller and how its training went."""

    controller: LinearController
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    stopped_by_budget: bool = False


def train_seeds(cfg: PlanConfig, generation: int) -> np.ndarray:
    """The episode seeds every candidate of ``generation`` plays."""
    first = cfg.seed + generation * cfg.episodes_per_candidate
    return np.arange(first, first + cfg.episodes_per_candidate, dtype=np.int64)


def held_out_seeds(cfg: PlanConfig) -> np.ndarray:
    """Seeds of the test episodes, apart from every training seed."""
    first = cfg.seed + TEST_SEED_OFFSET
    return np.arange(first, first + cfg.test_episodes, dtype=np.int64)


def episodes(pool: EnvPool, cfg: PlanConfig, seeds: np.ndarray, actor: Actor,
             record: bool = False) -> Episodes:
    """``seeds`` played side by side under the config's step cap and serve rule."""
    serve_action = fire_action(pool.game) if cfg.serve == "auto" else None
    return play(pool.get(len(seeds)), seeds, actor, cfg.max_steps, record, serve_action)


def calibrate(vae: torch.nn.Module, pool: EnvPool, cfg: PlanConfig
              ) -> tuple[np.ndarray, np.ndarray]:
    """(shift, scale) standardising the controller's features, from random-policy episodes."""
    n = cfg.popsize * cfg.episodes_per_candidate
    seeds = np.arange(n, dtype=np.int64) + cfg.seed + CALIBRATION_SEED_OFFSET
    recorder = FeatureRecorder(vae, cfg.features, n, pool.n_actions(), cfg.seed)
    episodes(pool, cfg, seeds, recorder)
    return standardisation(np.concatenate(recorder.kept))


def train_controller(vae: torch.nn.Module, pool: EnvPool, cfg: PlanConfig,
                     metadata: dict[str, Any], hooks: PlanHooks | None = None,
                     desc: str = "plan") -> Training:
    """CMA-ES (pycma) from zero weights; stops after ``generations`` or the time budget."""
    import cma

    hooks = hooks or NoHooks()
    n_actions = pool.n_actions()
    dim = n_params(vae.latent_dim, n_actions, cfg.features)
    shift, scale = calibrate(vae, pool, cfg)

    def controller(x: np.ndarray) -> LinearController:
        return LinearController.from_params(x, vae.latent_dim, n_actions, cfg.features,
                                            metadata, shift, scale)

    # pycma takes seed 0 as "from the clock": seed + 1 keeps runs reproducible
    es = cma.CMAEvolutionStrategy(np.zeros(dim), cfg.sigma0,
                                  {"popsize": cfg.popsize, "seed": cfg.seed + 1, "verbose": -9})
    owner = np.repeat(np.arange(cfg.popsize), cfg.episodes_per_candidate)
    result = Training(controller(np.zeros(dim)))
    started = time.monotonic()
    budget_s = cfg.time_budget_minutes * 60
    for generation in tqdm(range(cfg.generations), desc=desc, unit="gen", disable=None):
        if budget_s and time.monotonic() - started > budget_s:
            result.stopped_by_budget = True
            log.info("%s: time budget of %g min reached after %d generations", desc,
                     cfg.time_budget_minutes, generation)
            break
        candidates = es.ask()
        actor = LatentActor(vae, [controller(x) for x in candidates], owner)
        seeds = np.tile(train_seeds(cfg, generation), cfg.popsize)
        played = episodes(pool, cfg, seeds, actor)
        fitness = played.scores.reshape(cfg.popsize, -1).mean(axis=1)
        es.tell(candidates, (-fitness).tolist())
        stats = {"score_mean": float(fitness.mean()), "score_best": float(fitness.max()),
                 "score_worst": float(fitness.min()), "sigma": float(es.sigma),
                 "steps": float(played.lengths.sum()),
                 "seconds": time.monotonic() - started}
        result.history.append(stats)
        hooks.on_generation(generation, stats)
    result.controller = controller(es.result.xfavorite)
    result.seconds = time.monotonic() - started
    return result


def score_controller(vae: torch.nn.Module, ctrl: LinearController, pool: EnvPool,
                    cfg: PlanConfig, record: bool = False) -> Episodes:
    """The controller on the test seeds, all episodes side by side."""
    seeds = held_out_seeds(cfg)
    actor = LatentActor(vae, [ctrl], np.zeros(len(seeds), dtype=np.int64))
    return episodes(pool, cfg, seeds, actor, record)


def score_random_policy(pool: EnvPool, cfg: PlanConfig) -> Episodes:
    """Uniformly random actions on the same test seeds."""
    seeds = held_out_seeds(cfg)
    return episodes(pool, cfg, seeds, RandomActor(pool.n_actions(), cfg.seed))


def score_fixed_actions(pool: EnvPool, cfg: PlanConfig) -> tuple[int, Episodes]:
    """The action that, held every step, scores most on the test seeds, and its episodes: the
    best open-loop constant policy (picked on the test seeds, so a bound in its favour)."""
    seeds = held_out_seeds(cfg)
    played = [episodes(pool, cfg, seeds, FixedActor(a)) for a in range(pool.n_actions())]
    best = int(np.argmax([p.scores.mean() for p in played]))  # ties: the lowest index
    return best, played[best]


def summary_table(rows: dict[str, np.ndarray], game: str, max_steps: int,
                  serve: str = "controller") -> str:
    """A small text table: policy, mean +- std, min, max of the test scores."""
    n, width = len(next(iter(rows.values()))), max(28, *(len(name) + 2 for name in rows))
    lines = [f"{game}: {n} test episodes (the same seeds for every policy, max {max_steps} "
             f"steps, serve: {serve})", f"{'policy':<{width}}{'mean':>8}{'std':>8}{'min':>8}"
             f"{'max':>8}"]
    for name, scores in rows.items():
        lines.append(f"{name:<{width}}{scores.mean():>8.2f}{scores.std():>8.2f}"
                     f"{scores.min():>8.1f}{scores.max():>8.1f}")
    return "\n".join(lines)
