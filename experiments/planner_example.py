"""Planner side: load the champion VAE by name and encode live observations from the game.

    python experiments/planner_example.py --env_name Breakout              # atari-vae-breakout
    python experiments/planner_example.py --model_name M --alias champion --steps 200

`atari-vae tune` and `atari-vae register` register models; `champion` is the version that
passed the quality floor and scored best. MLFLOW_TRACKING_URI (else ./mlflow.db) says where.
"""

from __future__ import annotations

import logging
import time

import click
import torch

import atari_vae
from atari_vae.cli import friendly_errors
from atari_vae.envs import make_env, resolve_game

log = logging.getLogger("planner_example")


@click.command()
@click.option("--model_name", default="", help="Registered model; default atari-vae-<game>.")
@click.option("--alias", default="champion", show_default=True, help="Registry alias to load.")
@click.option("--version", default=None, help="A version number instead of the alias.")
@click.option("--env_name", default="Breakout", show_default=True, help="Game to play.")
@click.option("--steps", default=100, show_default=True, help="Environment steps to encode.")
@click.option("--seed", default=0, show_default=True, help="Environment and action seed.")
@friendly_errors
def main(model_name: str, alias: str, version: str | None, env_name: str, steps: int,
         seed: int) -> None:
    """Encode each observation of a random-policy episode into the latent space."""
    game = resolve_game(env_name)
    name = model_name or f"atari-vae-{game.rom_id.replace('_', '-')}"
    vae = atari_vae.load_registered(name, alias=alias, version=version)
    log.info("loaded %s (%s) with latent_dim %d", name,
             f"version {version}" if version else f"@{alias}", vae.latent_dim)
    env = make_env(game)
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    latents, started = [], time.perf_counter()
    try:
        for _ in range(steps):
            with torch.no_grad():  # a planner would act on mu here
                mu, _logvar = vae.encode(atari_vae.preprocess(obs))
            latents.append(mu)
            obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
            if terminated or truncated:
                obs, _ = env.reset()
    finally:
        env.close()
    per_step_ms = 1000 * (time.perf_counter() - started) / max(steps, 1)
    z = torch.cat(latents)
    log.info("observation %s -> latent mean %s per step; %d steps, %.2f ms per step (with the "
             "emulator); latent std over the episode: %.3f", tuple(obs.shape),
             tuple(latents[0].shape), len(z), per_step_ms, z.std(dim=0).mean().item())


if __name__ == "__main__":
    main()
