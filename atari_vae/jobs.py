"""The train job end to end: collect -> split -> fit -> log to MLflow."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from atari_vae import collect_policy, registry, tracking
from atari_vae.checkpoints import read_checkpoint
from atari_vae.config import TrainConfig
from atari_vae.data import load_games, split_by_episode
from atari_vae.envs import Game, parse_games
from atari_vae.files import atomic_write_text
from atari_vae.rundir import (
    check_free,
    check_fresh,
    check_output_dir,
    claimed,
    recorded_token,
)
from atari_vae.runtime import resolve_device
from atari_vae.schedule import planned, step_budget
from atari_vae.train import TrainResult, fit

log = logging.getLogger(__name__)
RUN_ID_FILE = "mlflow_run_id.txt"


def train_job(cfg: TrainConfig) -> TrainResult:
    """Validate flags, then train one VAE inside an MLflow run (resuming it with --resume)."""
    cfg.validate()
    games = parse_games(cfg.env_name)
    resolve_device(cfg.device)
    out = check_output_dir(cfg.output_dir)
    # Refused before MLflow, collection or any file: a directory in use, a missing or foreign
    # checkpoint, other flags, or (fresh) a directory that already holds a run.
    check_free(out)
    if cfg.resume:
        trained_for = read_checkpoint(out, cfg, recorded_token(out))[1]["config"]["epochs"]
    else:
        check_fresh(out)
        trained_for = cfg.epochs
    tracking.configure(cfg.experiment_name)  # an unreachable server, too, before any file
    # a missing controller, too: resolved once, so an alias that moves later changes nothing
    policy = collect_policy.resolve(cfg.collect_policy, cfg.policy_mix, games[0])
    with claimed(out, cfg.resume) as run_token:
        return _tracked_training(cfg, games, run_token, trained_for, policy)


def _tracked_training(cfg: TrainConfig, games: list[Game], run_token: str, trained_for: int,
                      policy: collect_policy.CollectPolicy | None = None) -> TrainResult:
    """Collect, split and fit inside the directory's MLflow run (a new one unless resuming)."""
    out = Path(cfg.output_dir)
    run_id_file = out / RUN_ID_FILE
    run_id = run_id_file.read_text().strip() if cfg.resume and run_id_file.exists() else None
    if run_id and os.environ.get("MLFLOW_RUN_ID"):
        run_id = None  # under `mlflow run`, log into the run MLflow created
    lost = run_id if run_id and not tracking.run_exists(run_id) else None
    if lost:
        log.warning("MLflow run %s is not in %s; the resumed training logs to a new run",
                    lost, tracking.tracking_uri())
        run_id = None
    name = f"train-{'+'.join(g.title for g in games)}"
    with tracking.tracked_run(name, tracking.base_tags("train", [g.title for g in games]),
                              run_id=run_id) as run:
        atomic_write_text(run_id_file, run.info.run_id)
        if not run_id:
            tracking.log_config(cfg)
        if lost:
            tracking.set_tags({"resumed_from_run_id": lost})
        if cfg.epochs and cfg.epochs != trained_for:  # a param cannot change: a tag says so
            tracking.set_tags({"epochs_extended_to": cfg.epochs})
        if policy:  # the version the alias named when the frames were collected
            tracking.set_tags({"collect_policy": policy.key})
            tracking.log_metrics({"data/policy_episodes": sum(
                policy.plays(cfg.seed, r) for r in range(cfg.num_episodes))})
        frames = load_games(games, cfg.num_episodes, cfg.max_steps, cfg.seed, policy=policy)
        train_set, val_set = split_by_episode(frames, cfg.val_split, cfg.seed)
        tracking.log_metrics({"n_train_frames": len(train_set), "n_val_frames": len(val_set)})
        if not cfg.epochs and not run_id:  # --epochs 0: the number --train_steps made
            tracking.log_params({"epochs_planned": planned(cfg, train_set).epochs,
                                 "train_steps_planned": step_budget(cfg)})
        result = fit(cfg, train_set, val_set, tracking.MlflowTrainHooks(), run_token)
        tracking.log_files(list(result.files.values()))
        registry.log_vae_model(result.model, {"game": ",".join(g.title for g in games),
                                              "kl_weight": cfg.kl_weight,
                                              "fg_weight": cfg.fg_weight},
                               metrics={**result.val_metrics, "best_epoch": result.best_epoch},
                               step=int(result.history[-1]["epoch"]))
        log.info("run %s: psnr %.2f dB (mean frame %.2f), fg_accuracy %.3f (mean frame %.3f)",
                 run.info.run_id, result.val_metrics["psnr"], result.val_metrics["baseline_psnr"],
                 result.val_metrics["fg_accuracy"], result.val_metrics["baseline_fg_accuracy"])
    return result
