"""The plain way, as users commonly write it: the benchmark's reference for `atari-vae train`.

One gymnasium env stepped at a time with a per-frame PIL resize, float32 frames in a torch
DataLoader, fp32 training. The recipe is the package's pixel recipe (same VAE class, same
pixel loss and weights, Adam with the same warm-up, cosine schedule and gradient clipping,
episodes split the same way; without the locator and mask heads, ~2 % of a step's FLOPs) on
the classic 32-64-128-256 channel widths (the World Models VAE's, and ours before
``--base_channels 16``); ``--base_channels 16`` trains our width, so what differs is the
engineering alone. No MLflow. Writes ``final_model.pt`` and ``timing.json``.

    python benchmarks/plain_baseline.py --num_episodes 20 --epochs 3 --batch_size 128 --out DIR
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from atari_vae.config import TrainConfig
from atari_vae.losses import pixel_weights, vae_loss
from atari_vae.model import LEGACY_ARCHITECTURE, VAE
from atari_vae.schedule import lr_factor
from atari_vae.train_step import GRAD_CLIP_NORM


def collect(env_id: str, num_episodes: int, max_steps: int, seed: int) -> list[torch.Tensor]:
    """One (T, 3, 64, 64) float32 tensor per random-policy episode."""
    import ale_py

    gym.register_envs(ale_py)
    env = gym.make(env_id)
    env.action_space.seed(seed)
    episodes = []
    for episode in range(num_episodes):
        obs, _ = env.reset(seed=seed + episode)
        frames, done = [], False
        while not done and len(frames) < max_steps:
            small = np.asarray(Image.fromarray(obs).resize((64, 64), Image.BOX))
            frames.append(torch.tensor(small, dtype=torch.float32).permute(2, 0, 1) / 255.0)
            obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
            done = terminated or truncated
        episodes.append(torch.stack(frames))
    env.close()
    return episodes


def train(episodes: list[torch.Tensor], cfg: TrainConfig) -> tuple[VAE, list[dict]]:
    """fp32 training with a DataLoader; validation on held-out episodes after each epoch."""
    torch.manual_seed(cfg.seed)
    order = torch.randperm(len(episodes)).tolist()
    n_val = min(max(1, round(cfg.val_split * len(episodes))), len(episodes) - 1)
    val = torch.cat([episodes[i] for i in order[:n_val]])
    train_frames = torch.cat([episodes[i] for i in order[n_val:]])
    background = train_frames.median(dim=0, keepdim=True).values
    model = VAE((3, 64, 64), cfg.latent_dim, base_channels=cfg.base_channels)
    model.init_output_bias(background)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loader = DataLoader(TensorDataset(train_frames), batch_size=cfg.batch_size, shuffle=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        lr_factor, total_steps=cfg.epochs * len(loader), warmup_steps=len(loader)))
    history = []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        for (x,) in loader:
            x_hat, mu, logvar = model(x)
            weights = pixel_weights(x, background, cfg.fg_weight, x_hat)
            loss = vae_loss(x_hat, x, mu, logvar, weights, cfg.kl_weight, cfg.free_bits).total
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
            optimizer.step()
            scheduler.step()
        history.append({"epoch": epoch, **validate(model, val, background, cfg)})
        print(f"epoch {epoch}: {history[-1]}", flush=True)
    return model, history


@torch.no_grad()
def validate(model: VAE, val: torch.Tensor, background: torch.Tensor,
             cfg: TrainConfig) -> dict[str, float]:
    """Validation loss and PSNR with z = posterior mean."""
    model.eval()
    loss = sq_err = 0.0
    for (x,) in DataLoader(TensorDataset(val), batch_size=256):
        x_hat, mu, logvar = model(x)
        weights = pixel_weights(x, background, cfg.fg_weight, x_hat)
        loss += vae_loss(x_hat, x, mu, logvar, weights, cfg.kl_weight).total.item() * len(x)
        sq_err += (x_hat - x).pow(2).sum().item()
    return {"val_loss": loss / len(val),
            "val_psnr": 10 * math.log10(val.numel() / max(sq_err, 1e-12))}


def main() -> None:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env_id", default="ALE/Breakout-v5")
    parser.add_argument("--num_episodes", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--base_channels", type=int,
                        default=LEGACY_ARCHITECTURE["base_channels"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cfg = TrainConfig(num_episodes=args.num_episodes, epochs=args.epochs,
                      batch_size=args.batch_size, seed=args.seed,
                      base_channels=args.base_channels)
    started = time.perf_counter()
    episodes = collect(args.env_id, cfg.num_episodes, cfg.max_steps, cfg.seed)
    collected = time.perf_counter()
    model, history = train(episodes, cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "final_model.pt")
    done = time.perf_counter()
    timing = {"collect_s": collected - started, "train_s": done - collected,
              "frames": sum(len(e) for e in episodes), "history": history}
    (args.out / "timing.json").write_text(json.dumps(timing, indent=2))


if __name__ == "__main__":
    main()
