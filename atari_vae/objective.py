"""One tune trial: train with the trial's kl_weight and latent_dim in a nested MLflow run,
report each epoch to Optuna for pruning, and return the held-out objective.

Objective (maximised): ``metrics.mean_balanced_psnr`` of the trial's model on the validation
episodes, each game scored against its own training background and mean frame: the same
function and aggregation that chooses the champion (``promotion.py``). Subject to the rate
budget: held-out KL must not exceed ``--kl_budget`` nats per frame (an Optuna constraint).
Pruning uses a per-epoch value from the pooled validation metrics (``TrialHooks``).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import optuna

from atari_vae import registry, tracking
from atari_vae.config import TrainConfig, TuneConfig, power_of_two_dims
from atari_vae.data import FrameSet
from atari_vae.envs import to_float
from atari_vae.errors import AtariVaeError
from atari_vae.losses import foreground_mask
from atari_vae.metrics import (
    GameReferences,
    balanced_psnr,
    game_references,
    mean_balanced_psnr,
    per_frame,
)
from atari_vae.model import VAE
from atari_vae.study import CONSTRAINT
from atari_vae.train import fit

log = logging.getLogger(__name__)


def pruning_value(value: float, kl: float, budget: float) -> float:
    """``value`` within the rate budget, else minus the excess nats (below any feasible value)."""
    return value if kl <= budget else -(kl - budget)


def foreground_fraction(refs: GameReferences, val_set: FrameSet, chunk: int = 1024) -> float:
    """Share of validation pixels off their game's training background, as training sees it."""
    backgrounds = refs.backgrounds
    frames, game_ids = val_set.frames_uint8, val_set.game_ids
    fg = sum(foreground_mask(to_float(frames[i:i + chunk]),
                             per_frame(backgrounds, game_ids[i:i + chunk])).sum().item()
             for i in range(0, len(frames), chunk))
    return fg / (len(frames) * frames.shape[2] * frames.shape[3])


def validation_value(model: VAE, val_set: FrameSet, refs: GameReferences) -> float:
    """The objective: ``mean_balanced_psnr`` over each game's validation frames, scored against
    that game's training mean frame and background (``refs``, indexed like ``val_set.games``)."""
    from atari_vae.evaluate import score_model

    per_game = []
    for index, title in enumerate(val_set.games):
        frames = val_set.for_game(title).frames_uint8
        per_game.append(score_model(model, frames, refs.means[index:index + 1],
                                    refs.backgrounds[index:index + 1])[0])
    return mean_balanced_psnr(per_game)


class TrialHooks:
    """Log each epoch to the trial's MLflow run, report it to Optuna, prune hopeless trials."""

    def __init__(self, trial: optuna.Trial, cfg: TuneConfig, fg_fraction: float) -> None:
        self.trial, self.cfg, self.fg_fraction = trial, cfg, fg_fraction
        self.mlflow = tracking.MlflowTrainHooks()

    def on_epoch_end(self, epoch: int, stats: dict[str, float]) -> None:
        value = balanced_psnr(10 ** (-stats["val_psnr"] / 10), 10 ** (-stats["val_fg_psnr"] / 10),
                              self.fg_fraction)
        reported = pruning_value(value, stats["val_kl"], self.cfg.kl_budget)
        self.mlflow.on_epoch_end(epoch, {**stats, "val_balanced_psnr": value,
                                         "pruning_value": reported})
        self.trial.report(reported, epoch)
        # pruning after the last epoch would only throw a finished model away
        if epoch < self.cfg.epochs and self.trial.should_prune():
            raise optuna.TrialPruned(f"epoch {epoch}: {reported:.3f} is below the median")

    def on_checkpoint(self, epoch: int, files: list[Path]) -> None:
        self.mlflow.on_checkpoint(epoch, files)


def trial_config(cfg: TuneConfig, number: int, **params: Any) -> TrainConfig:
    """The TrainConfig of one trial: the study's training flags plus the trial's params."""
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}
    base.update(params, output_dir=str(Path(cfg.output_dir) / f"trial_{number}"), resume=False)
    return TrainConfig(**base)


class Objective:
    """One trial: sample params, train in a nested MLflow run, return the held-out value."""

    def __init__(self, cfg: TuneConfig, train_set: FrameSet, val_set: FrameSet) -> None:
        self.cfg, self.train_set, self.val_set = cfg, train_set, val_set
        self.refs = game_references(train_set.frames_uint8, train_set.game_ids,
                                    len(train_set.games))
        self.fg_fraction = foreground_fraction(self.refs, val_set)
        self.titles = list(train_set.games)

    def __call__(self, trial: optuna.Trial) -> float:
        cfg = self.cfg
        params = {"kl_weight": trial.suggest_float("kl_weight", cfg.kl_weight_min,
                                                   cfg.kl_weight_max, log=True),
                  "latent_dim": trial.suggest_categorical(
                      "latent_dim", power_of_two_dims(cfg.latent_dim_min, cfg.latent_dim_max))}
        if "mlflow_run_id" in trial.user_attrs:  # a retry carries the killed trial's attrs
            tracking.mark_killed(trial.user_attrs["mlflow_run_id"])
        try:
            return self._train(trial, params)
        except optuna.TrialPruned:
            raise
        except Exception as exc:  # any failure fails this trial only; the study goes on
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            trial.set_user_attr("error", f"{type(exc).__name__}: {message}"[:500])
            log.warning("trial %d failed (%s): %s", trial.number, type(exc).__name__, message,
                        exc_info=not isinstance(exc, AtariVaeError))
            return float("nan")  # Optuna marks the trial FAIL

    def _train(self, trial: optuna.Trial, params: dict[str, Any]) -> float:
        trial_cfg = trial_config(self.cfg, trial.number, **params)
        tags = {**tracking.base_tags("tune-trial", self.titles), "optuna_study":
                self.cfg.study_name, "optuna_trial": trial.number}
        pruned: optuna.TrialPruned | None = None
        with tracking.tracked_run(f"trial-{trial.number}", tags, nested=True) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            tracking.log_config(trial_cfg)
            try:
                result = fit(trial_cfg, self.train_set, self.val_set,
                             TrialHooks(trial, self.cfg, self.fg_fraction))
            except optuna.TrialPruned as exc:
                pruned = exc
                tracking.set_tags({"optuna_state": "PRUNED"})
            except Exception as exc:
                tracking.set_tags({"optuna_state": "FAIL", "error": str(exc)[:500]})
                raise
            if pruned is None:
                value, kl = self._finish(trial, trial_cfg, result)
        if pruned is not None:
            raise pruned
        tracking.log_metrics({"trial_value": value, "trial_kl": kl}, step=trial.number)
        return value

    def _finish(self, trial: optuna.Trial, trial_cfg: TrainConfig, result: Any) -> tuple[float,
                                                                                        float]:
        m = result.val_metrics
        value = validation_value(result.model, self.val_set, self.refs)
        kl = next(s["val_kl"] for s in result.history if s["epoch"] == result.best_epoch)
        trial.set_constraint(CONSTRAINT, kl - self.cfg.kl_budget)
        feasible = kl <= self.cfg.kl_budget
        metrics = {**m, "balanced_psnr": value, "kl": kl, "best_epoch": result.best_epoch}
        tracking.log_files([p for p in result.files.values() if p.suffix == ".png"])
        info = registry.log_vae_model(result.model, {
            "game": ",".join(self.titles), "kl_weight": trial_cfg.kl_weight,
            "fg_weight": trial_cfg.fg_weight, "optuna_study": self.cfg.study_name,
            "optuna_trial": trial.number}, metrics=metrics, step=trial_cfg.epochs)
        for key in ("psnr", "fg_psnr", "fg_accuracy", "baseline_fg_accuracy"):
            trial.set_user_attr(key, m[key])
        trial.set_user_attr("kl", kl)
        trial.set_user_attr("model_uri", info.model_uri)
        tracking.set_tags({"optuna_state": "COMPLETE", "feasible": feasible})
        log.info("trial %d: balanced PSNR %.2f dB, fg_accuracy %.3f, KL %.1f nats/frame (%s "
                 "budget %.1f)", trial.number, value, m["fg_accuracy"], kl,
                 "within" if feasible else "over", self.cfg.kl_budget)
        return value, kl
