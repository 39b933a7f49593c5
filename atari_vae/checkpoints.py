"""Training checkpoints on disk: written atomically, found, checked against the flags of a
run that wants to resume them, and restored. Loaded with ``weights_only=True``: tensors and
plain types only, never pickled code."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path
from typing import Any

import torch

from atari_vae.config import TrainConfig
from atari_vae.envs import parse_games
from atari_vae.errors import AtariVaeError
from atari_vae.files import atomic_path, load_error_reason
from atari_vae.model import LEGACY_ARCHITECTURE
from atari_vae.runtime import resolve_device, resolve_precision

log = logging.getLogger(__name__)
# Version 2: a multi-game run weighs each frame against its own game's background, not one
# median over all games; losses of the two are not comparable, so such a run cannot resume.
LOSS_VERSION = 2


def save_atomic(obj: Any, path: Path) -> None:
    # Serialised in memory first: a full disk then raises OSError (ENOSPC) from the write,
    # where torch.save to a file raises an opaque RuntimeError from its zip writer.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getbuffer())
    except OSError as exc:  # name the file the user would look for, not the temporary
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint with the highest epoch number in ``out``, if any."""
    found = [(int(m.group(1)), p) for p in out.glob("checkpoint_epoch_*.pt")
             if (m := re.fullmatch(r"checkpoint_epoch_(\d+)\.pt", p.name))]
    return max(found)[1] if found else None


# Flags a resumed run must share with the checkpoint: they fix the frames, split, model, loss
# and optimiser. --precision is compared as resolved (bf16 or fp32); --epochs may grow.
RESUME_MUST_MATCH = ("env_name", "num_episodes", "max_steps", "seed", "val_split", "latent_dim",
                     "base_channels", "batch_size", "lr", "weight_decay", "kl_weight",
                     "fg_weight", "obj_weight", "loc_weight", "coord_weight", "fourier_weight",
                     "mask_weight", "free_bits", "decoder", "collect_policy", "policy_mix",
                     "object_oversample")
PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
# A checkpoint that predates a flag trained as these say: loss terms off, the 32-256 wide net.
BEFORE_THEY_EXISTED = {"obj_weight": 0.0, "loc_weight": 0.0, "coord_weight": 0.0,
                       "fourier_weight": 0.0, "mask_weight": 0.0,
                       "base_channels": LEGACY_ARCHITECTURE["base_channels"]}


def _same_flag(name: str, saved: Any, given: Any) -> bool:
    if name == "env_name":  # "breakout" and "ALE/Breakout-v5" name the same game
        return [g.title for g in parse_games(saved)] == [g.title for g in parse_games(given)]
    return saved == given


def resume_mismatch(ckpt: dict[str, Any], cfg: TrainConfig, run_token: str) -> str | None:
    """Why ``cfg`` cannot continue ``ckpt``, in words; None when it can."""
    if ckpt.get("run_token", "") != run_token:
        return ("it belongs to another training run than the one this directory records; "
                "give another --output_dir for a new run")
    saved = ckpt["config"]
    for name in RESUME_MUST_MATCH:  # load_state_dict's own message is many lines long
        # A flag newer than the checkpoint had its BEFORE_THEY_EXISTED value, else its default.
        before = BEFORE_THEY_EXISTED.get(name, getattr(TrainConfig, name))
        saved_value = saved.get(name, before)
        if not _same_flag(name, saved_value, getattr(cfg, name)):
            return (f"it was trained with --{name} {saved_value}, not {getattr(cfg, name)}; "
                    f"resume with the run's original flags")
    if 0 < cfg.epochs < saved["epochs"]:  # 0: the number the run planned, which is saved
        return (f"it was trained with --epochs {saved['epochs']}, not {cfg.epochs}; --epochs "
                f"may stay or grow on resume")
    precision = PRECISION_NAMES[resolve_precision(cfg.precision, resolve_device(cfg.device))]
    if ckpt.get("precision", precision) != precision:
        meaning = " (what --precision auto means here)" if cfg.precision == "auto" else ""
        return (f"it was trained with --precision {ckpt['precision']}, not {precision}"
                f"{meaning}; resume with --precision {ckpt['precision']}")
    if len(parse_games(cfg.env_name)) > 1 and ckpt.get("loss_version", 1) != LOSS_VERSION:
        return ("it was written before multi-game runs weighed each game against its own "
                "background, so its losses are not comparable; start a new run")
    return None


def read_checkpoint(out: Path, cfg: TrainConfig, run_token: str = "") -> tuple[Path, dict]:
    """The newest checkpoint in ``out`` (weights only), checked to be this run's, like ``cfg``."""
    path = latest_checkpoint(out)
    if path is None:
        raise AtariVaeError(f"--resume: no checkpoint_epoch_*.pt in {out} to resume from")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        mismatch = resume_mismatch(ckpt, cfg, run_token)
    except Exception as exc:  # truncated file, foreign file
        raise AtariVaeError(f"--resume: cannot restore {path}: {load_error_reason(exc)}") from exc
    if mismatch:
        raise AtariVaeError(f"--resume: cannot restore {path}: {mismatch}")
    return path, ckpt


def restore_checkpoint(path: Path, ckpt: dict[str, Any], model: torch.nn.Module,
                       optimizer: torch.optim.Optimizer, scheduler: Any,
                       order_rng: torch.Generator) -> None:
    """Restore model, optimizer, schedule and RNG states from ``ckpt`` (read from ``path``)."""
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
    except Exception as exc:  # a foreign file that happens to have the keys
        raise AtariVaeError(f"--resume: cannot restore {path}: {load_error_reason(exc)}") \
            from exc
    torch.set_rng_state(ckpt["torch_rng"])
    if ckpt["cuda_rng"]:
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    order_rng.set_state(ckpt["order_rng"])
    log.info("resuming from %s (epoch %d)", path, ckpt["epoch"])
