"""The tune job: an Optuna study over ``kl_weight`` and ``latent_dim``, then the registry.

The study's storage and trial choice are in ``study.py``, one trial in ``objective.py``, the
figures in ``study_plots.py``, and who becomes champion in ``promotion.py``.

``n_trials`` counts this worker's trials; workers sharing storage and study name add theirs to
one study. After its trials each worker registers the study's best feasible trial.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from atari_vae import promotion, registration, registry, tracking
from atari_vae.config import TuneConfig
from atari_vae.data import load_games, split_by_episode
from atari_vae.envs import Game, parse_games
from atari_vae.errors import AtariVaeError
from atari_vae.jobs import check_output_dir
from atari_vae.objective import Objective
from atari_vae.runtime import resolve_device
from atari_vae.study import (
    best_feasible_trial,
    display_url,
    no_feasible_message,
    open_study,
    resolve_storage,
)
from atari_vae.study_plots import study_figures

log = logging.getLogger(__name__)


@dataclass
class TuneResult:
    """What one tune invocation leaves: the study's best feasible trial and the registry verdict."""

    study_name: str
    storage: str
    run_id: str
    best_trial: int
    best_value: float
    best_params: dict[str, Any]
    decision: promotion.ChampionDecision


def tune_job(cfg: TuneConfig) -> TuneResult:
    """Validate flags, run this worker's trials of the shared study, register the best trial."""
    cfg.validate()
    games = parse_games(cfg.env_name)
    resolve_device(cfg.device)
    check_output_dir(cfg.output_dir)
    optuna.logging.disable_default_handler()  # Optuna's lines go through our log format
    optuna.logging.enable_propagation()
    url = resolve_storage(cfg.storage)
    study = open_study(cfg, url)
    name = cfg.model_name or registration.default_model_name(games)
    tracking.configure(cfg.experiment_name)
    titles = [g.title for g in games]
    tags = {**tracking.base_tags("tune", titles), "optuna_study": cfg.study_name,
            "optuna_storage": display_url(url), "registered_model": name}
    with tracking.tracked_run(f"tune-{cfg.study_name}", tags) as run:
        tracking.log_config(cfg)  # its flags only: trials draw latent_dim and kl_weight
        frames = load_games(games, cfg.num_episodes, cfg.max_steps, cfg.seed)
        train_set, val_set = split_by_episode(frames, cfg.val_split, cfg.seed)
        started = time.perf_counter()
        study.optimize(Objective(cfg, train_set, val_set), n_trials=cfg.n_trials or None,
                       timeout=cfg.timeout or None, gc_after_trial=True)
        tracking.log_metrics({"tune_seconds": time.perf_counter() - started})
        best = best_feasible_trial(study)
        tracking.log_files(study_figures(study, Path(cfg.output_dir), cfg.kl_budget),
                           "study_plots")
        if best is None:
            raise AtariVaeError(no_feasible_message(study, cfg))
        tracking.log_params({f"best_{k}": v for k, v in best.params.items()})
        tracking.log_metrics({"best_value": best.value, "best_trial": best.number,
                              "best_kl": best.user_attrs["kl"]})
        log.info("study %s: %d trials; best feasible trial %d: %s, mean balanced PSNR %.2f dB, "
                 "KL %.1f nats/frame", cfg.study_name, len(study.trials), best.number,
                 best.params, best.value, best.user_attrs["kl"])
        decision = register_best(best, cfg, games, name)
        tracking.set_tags({"registered_version": decision.version,
                           "champion_decision": decision.reason,
                           "champion_version": decision.champion or "none"})
    return TuneResult(cfg.study_name, display_url(url), run.info.run_id, best.number,
                      best.value, best.params, decision)


def register_best(best: optuna.trial.FrozenTrial, cfg: TuneConfig, games: list[Game],
                  name: str) -> promotion.ChampionDecision:
    """Register the best feasible trial's model with tags for its metrics and provenance."""
    u = best.user_attrs
    tags = {"game": ",".join(g.title for g in games), "latent_dim": best.params["latent_dim"],
            "kl_weight": best.params["kl_weight"], "fg_weight": cfg.fg_weight,
            "val_balanced_psnr": round(best.value, 4), "val_kl": round(u["kl"], 3),
            "val_fg_accuracy": round(u["fg_accuracy"], 4), "val_psnr": round(u["psnr"], 4),
            "val_fg_psnr": round(u["fg_psnr"], 4), "optuna_study": cfg.study_name,
            "optuna_trial": best.number, "preprocessing": registry.PREPROCESSING,
            "epochs": cfg.epochs, "num_episodes": cfg.num_episodes}
    description = (
        f"VAE encoder for {tags['game']} (64x64 RGB; atari_vae.preprocess). Trial {best.number} "
        f"of Optuna study {cfg.study_name!r}: latent_dim {tags['latent_dim']}, kl_weight "
        f"{best.params['kl_weight']:.4g}, fg_weight {cfg.fg_weight:g}. Validation: balanced PSNR "
        f"{best.value:.2f} dB, fg_accuracy {u['fg_accuracy']:.3f}, KL {u['kl']:.1f} nats/frame "
        f"(budget {cfg.kl_budget:g}). Load: atari_vae.load_registered({name!r}).")
    if not tracking.run_exists(u["mlflow_run_id"]):
        raise AtariVaeError(
            f"the study's best trial {best.number} logged its model to another MLflow store "
            f"(run {u['mlflow_run_id']} is not in {tracking.tracking_uri()}); workers of one "
            f"study must share MLFLOW_TRACKING_URI")
    return registration.register_and_promote(u["model_uri"], u["mlflow_run_id"], name, games,
                                           cfg.eval_samples, tags, description)

