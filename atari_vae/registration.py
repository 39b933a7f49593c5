"""Registering a model version, and the register job: put a trained model (``.pt`` from train,
or ``runs:/<run_id>/<game>``) through the same quality floor and champion comparison as tune.

``.pt`` files are logged pickle-free to a new MLflow run (``registry.log_vae_model``) first.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from atari_vae import flag_checks, promotion, registry, tracking
from atari_vae.config import RegisterConfig
from atari_vae.envs import Game, parse_games
from atari_vae.jobs import RUN_ID_FILE

log = logging.getLogger(__name__)
MODEL_DESCRIPTION = (
    "atari-vae encoders: 64x64 RGB Atari frames (atari_vae.preprocess) -> latent means. Alias "
    "'champion' marks the version that passes the quality floor and scores best on the "
    "selection frames (see each version's quality_floor, selection_score and "
    "champion_decision tags). Planner: atari_vae.load_registered('{name}'); serving: "
    "atari-vae serve --model_uri models:/{name}@champion.")


def default_model_name(games: list[Game]) -> str:
    """atari-vae-breakout, atari-vae-space-invaders, atari-vae-breakout-pong."""
    return "atari-vae-" + "-".join(g.rom_id.replace("_", "-") for g in games)


def register_version(model_uri: str, name: str, run_id: str, tags: dict[str, Any],
                     description: str) -> str:
    """Register ``model_uri`` (logged by run ``run_id``) as ``name``, reusing its version if any
    (several workers of one study may register the same best trial); marked pending."""
    import mlflow

    flag_checks.model_name(name)  # also keeps the quote out of the search filter below
    client = mlflow.MlflowClient()
    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if existing:
        version = str(max(int(v.version) for v in existing))
    else:
        version = str(mlflow.register_model(model_uri, name, tags={
            k: str(v) for k, v in tags.items()}).version)
        client.update_model_version(name, version, description=description)
        if not client.get_registered_model(name).description:
            client.update_registered_model(name, description=MODEL_DESCRIPTION.format(name=name))
    promotion.mark_pending(client, name, version)
    return version


def register_and_promote(model_uri: str, run_id: str, name: str, games: list[Game],
                         eval_samples: int, tags: dict[str, Any],
                         description: str) -> promotion.ChampionDecision:
    """Register a logged model and let ``promotion`` decide whether it becomes champion."""
    version = register_version(model_uri, name, run_id, tags, description)
    return promotion.promote_version(name, version, games, eval_samples)


def register_job(cfg: RegisterConfig) -> promotion.ChampionDecision:
    """Validate flags, log a ``.pt`` model (or take a logged one), register it, decide."""
    cfg.validate()
    games = parse_games(cfg.env_name)
    titles = [g.title for g in games]
    name = cfg.model_name or default_model_name(games)
    model = registry.load_model(cfg.model_path)  # a bad path fails before any MLflow run
    tracking.configure(cfg.experiment_name)
    tags = {"game": ",".join(titles), "latent_dim": model.latent_dim,
            "preprocessing": registry.PREPROCESSING, "source_model": _source(cfg.model_path)}
    with tracking.tracked_run(f"register-{'+'.join(titles)}",
                              tracking.base_tags("register", titles)) as run:
        tracking.log_config(cfg)
        if cfg.model_path.startswith("runs:/"):
            uri, run_id = cfg.model_path, cfg.model_path.split("/")[1]
        else:
            info = registry.log_vae_model(model, {"game": ",".join(titles)})
            uri, run_id = info.model_uri, run.info.run_id
        description = (f"VAE encoder for {tags['game']} (64x64 RGB; atari_vae.preprocess), "
                       f"latent_dim {model.latent_dim}, from {tags['source_model']}. Load: "
                       f"atari_vae.load_registered({name!r}).")
        decision = register_and_promote(uri, run_id, name, games, cfg.eval_samples, tags,
                                        description)
        tracking.set_tags({"registered_model": name, "registered_version": decision.version,
                           "champion_decision": decision.reason,
                           "champion_version": decision.champion or "none"})
    return decision


def _source(model_path: str) -> str:
    """The model file's absolute path, with the training run that wrote it when known."""
    if model_path.startswith("runs:/"):
        return model_path
    path = Path(model_path).resolve()
    run_file = path.parent / RUN_ID_FILE
    trained = f" (trained in MLflow run {run_file.read_text().strip()})" \
        if run_file.is_file() else ""
    return f"{path}{trained}"
