"""The plan job end to end: champion VAE -> CMA-ES controller -> test vs the random policy and
the random-encoder control -> picture -> the controller registered as ``<vae name>-controller``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from atari_vae import plots, policy_registry, registry, tracking
from atari_vae.config import PlanConfig
from atari_vae.controller import encode_frames, save_controller_dir
from atari_vae.envs import (
    FRAMESKIP,
    STICKY_ACTION_PROB,
    Game,
    action_meanings,
    resolve_game,
)
from atari_vae.files import atomic_write_text
from atari_vae.model import random_init_like
from atari_vae.plan import (
    held_out_seeds,
    score_controller,
    score_fixed_actions,
    score_random_policy,
    summary_table,
    train_controller,
)
from atari_vae.policy_registry import VAE_NAME_TAG, VAE_VERSION_TAG
from atari_vae.registration import default_model_name
from atari_vae.rollout import EnvPool, Episodes
from atari_vae.runtime import resolve_device

log = logging.getLogger(__name__)
STRIP_FRAMES = 8
OURS, RANDOM, CONTROL = "ours (VAE z)", "random policy", "control (random encoder)"
FIXED = "best fixed action"


@dataclass
class PlanResult:
    """Test scores per policy (same seeds), the registered controller and the run."""

    scores: dict[str, np.ndarray] = field(default_factory=dict)
    controller_name: str = ""
    controller_version: str = ""
    champion_decision: str = ""
    fixed_action: str = ""  # the action FIXED holds
    run_id: str = ""
    table: str = ""


def plan_job(cfg: PlanConfig) -> PlanResult:
    """Validate flags, load the VAE at the alias, then train, test and register in one run."""
    cfg.validate()
    game = resolve_game(cfg.env_name)
    vae_name = cfg.model_name or default_model_name([game])
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    tracking.configure(cfg.experiment_name)
    vae_version = policy_registry.vae_version_at(vae_name, cfg.alias)  # one line if none
    vae = registry.load_registered(vae_name, version=vae_version, device=device)
    log.info("planning on %s version %s (@%s), latent_dim %d", vae_name, vae_version, cfg.alias,
             vae.latent_dim)
    tags = {**tracking.base_tags("plan", [game.title]), VAE_NAME_TAG: vae_name,
            VAE_VERSION_TAG: vae_version}
    pool = EnvPool(game, cfg.max_steps)
    try:
        with tracking.tracked_run(f"plan-{game.title}", tags) as run:
            tracking.log_config(cfg)
            result = _plan(cfg, game, vae, vae_name, vae_version, pool)
            result.run_id = run.info.run_id
    finally:
        pool.close()
    return result


def _plan(cfg: PlanConfig, game: Game, vae: torch.nn.Module, vae_name: str, vae_version: str,
          pool: EnvPool) -> PlanResult:
    started = time.monotonic()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(action_meanings(game))
    metadata = {"game": game.title, "action_names": names, VAE_NAME_TAG: vae_name,
                VAE_VERSION_TAG: vae_version, "serve": cfg.serve}
    ours = train_controller(vae, pool, cfg, metadata, tracking.MlflowPlanHooks("plan/"), "plan")
    test = score_controller(vae, ours.controller, pool, cfg, record=True)
    fixed, held = score_fixed_actions(pool, cfg)
    result = PlanResult({OURS: test.scores, RANDOM: score_random_policy(pool, cfg).scores,
                         FIXED: held.scores}, fixed_action=names[fixed])
    metrics = {"plan/train_seconds": ours.seconds, "plan/generations": len(ours.history)}
    if cfg.control == "random_encoder":
        control_vae = random_init_like(vae, cfg.seed).eval()
        control = train_controller(control_vae, pool, cfg, {**metadata, "encoder": "random"},
                                   tracking.MlflowPlanHooks("plan/control_"), "control")
        result.scores[CONTROL] = score_controller(control_vae, control.controller, pool,
                                                  cfg).scores
        metrics.update({"plan/control_train_seconds": control.seconds,
                        "plan/control_generations": len(control.history)})
    metrics.update(_test_metrics(result.scores))
    metrics["plan/job_seconds"] = time.monotonic() - started
    tracking.log_metrics(metrics)
    rows = {f"{k}: {result.fixed_action}" if k == FIXED else k: v
            for k, v in result.scores.items()}
    result.table = summary_table(rows, game.title, cfg.max_steps, cfg.serve)
    log.info("test scores\n%s", result.table)
    save_controller_dir(ours.controller, out / "controller")  # the logged model has it too
    tracking.log_files(_write_outputs(cfg, out, vae, test, names, result, metrics))
    _register(cfg, game, ours.controller, vae_name, vae_version, result,
              lambda version: _champion_score(cfg, pool, vae_name, version))
    return result


def _test_metrics(scores: dict[str, np.ndarray]) -> dict[str, float]:
    """``plan/<policy>_score_mean`` and ``_std`` of each policy played on the test seeds."""
    metrics = {}
    for key, label in ((OURS, "test"), (RANDOM, "random_policy"), (FIXED, "fixed_action"),
                       (CONTROL, "control_test")):
        if key in scores:
            metrics[f"plan/{label}_score_mean"] = float(scores[key].mean())
            metrics[f"plan/{label}_score_std"] = float(scores[key].std())
    return metrics


def _champion_score(cfg: PlanConfig, pool: EnvPool, vae_name: str, version: str
                    ) -> float | None:
    """The mean score of a registered controller version (with its VAE) on this run's test
    seeds: how a champion tested on other episodes is compared; None under another serve."""
    champion = policy_registry.load_policy(policy_registry.controller_name(vae_name),
                                           version=version,
                                           device=str(resolve_device(cfg.device)))
    if champion.serve != cfg.serve:  # it was trained for another game flow: no fair match
        return None
    return float(score_controller(champion.vae, champion.controller, pool, cfg).scores.mean())


def _write_outputs(cfg: PlanConfig, out: Path, vae: torch.nn.Module, test: Episodes,
                   names: list[str], result: PlanResult, metrics: dict[str, float]
                   ) -> list[Path]:
    """summary.txt, scores.json (every test score) and policy_strip.png into ``out``."""
    atomic_write_text(out / "summary.txt", result.table + "\n")
    atomic_write_text(out / "scores.json", json.dumps({
        "test_seeds": held_out_seeds(cfg).tolist(), "max_steps": cfg.max_steps,
        "serve": cfg.serve,
        "scores": {k: v.tolist() for k, v in result.scores.items()},
        "fixed_action": result.fixed_action, "metrics": metrics},
        indent=2))
    pick = np.linspace(0, len(test.frames) - 1, min(STRIP_FRAMES, len(test.frames))).astype(int)
    frames = torch.from_numpy(test.frames[pick])
    with torch.no_grad():
        mu = torch.from_numpy(encode_frames(vae, frames)).to(next(vae.parameters()).device)
        recons = vae.decode(mu).cpu()
    labels = [f"t={t}: {names[a]}" for t, a in zip(pick.tolist(), test.actions[pick].tolist())]
    strip = plots.policy_strip(frames.float() / 255, recons, labels, out / "policy_strip.png",
                               f"{cfg.env_name}: test episode 1 (score {test.scores[0]:g}): "
                               f"frame, reconstruction, action played")
    return [out / "summary.txt", out / "scores.json", strip]


def _register(cfg: PlanConfig, game: Game, ctrl, vae_name: str, vae_version: str,
              result: PlanResult, rescore: Callable[[str], float | None]) -> None:
    """Log the controller, register it as ``<vae name>-controller``, decide the champion."""
    import ale_py

    info = policy_registry.log_controller_model(ctrl)
    seeds = held_out_seeds(cfg)
    protocol = (f"{game.title} test seeds {seeds[0]}..{seeds[-1]} max_steps={cfg.max_steps} "
                f"frameskip={FRAMESKIP} sticky={STICKY_ACTION_PROB} ale={ale_py.__version__}")
    if cfg.serve != "controller":  # the protocol of every earlier run stays what it was
        protocol += f" serve={cfg.serve}"
    name = policy_registry.controller_name(vae_name)
    version, reason, _ = policy_registry.register_controller(
        info.model_uri, name, {VAE_NAME_TAG: vae_name, VAE_VERSION_TAG: vae_version,
                               "game": game.title, "features": ctrl.features,
                               "serve": cfg.serve},
        float(result.scores[OURS].mean()), protocol, rescore)
    result.controller_name, result.controller_version = name, version
    result.champion_decision = reason
    tracking.set_tags({"registered_model": name, "registered_version": version,
                       "champion_decision": reason, "fixed_action": result.fixed_action})
