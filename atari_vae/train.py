"""The training loop: fit, validate, checkpoint, finish. It knows nothing of MLflow: trackers
attach as hooks. Checkpoint files are ``checkpoints``' concern, a step's loss ``train_step``'s."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import torch
from tqdm.auto import tqdm

from atari_vae import plots
from atari_vae.checkpoints import (
    LOSS_VERSION,
    PRECISION_NAMES,
    read_checkpoint,
    restore_checkpoint,
    save_atomic,
)
from atari_vae.config import TrainConfig
from atari_vae.data import FrameSet, balanced_order
from atari_vae.envs import to_float
from atari_vae.errors import NonFiniteLossError
from atari_vae.files import atomic_path, remove_partial_files
from atari_vae.losses import LossTerms, foreground_rate, small_objects, usually_empty
from atari_vae.metrics import (
    GameReferences,
    Scorer,
    game_references,
    median_background,
    score,
)
from atari_vae.model import VAE
from atari_vae.runtime import resolve_device, resolve_precision, seed_everything
from atari_vae.schedule import lr_factor, planned, schedule_epochs, steps_per_epoch
from atari_vae.train_step import backward_step, build_model, loss_terms

log = logging.getLogger(__name__)
EVAL_BATCH = 512
N_PREVIEW = 8


class TrainHooks(Protocol):
    """Called by ``fit``; a hook may raise to stop training (e.g. optuna.TrialPruned)."""

    def on_epoch_end(self, epoch: int, stats: dict[str, float]) -> None: ...

    def on_checkpoint(self, epoch: int, files: list[Path]) -> None: ...


@dataclass
class TrainResult:
    """What a finished run leaves: the best model, its validation metrics and the file paths."""

    model: VAE
    best_epoch: int
    best_val_loss: float
    val_metrics: dict[str, float]
    history: list[dict[str, float]]
    files: dict[str, Path] = field(default_factory=dict)


def fit(cfg: TrainConfig, train_set: FrameSet, val_set: FrameSet,
        hooks: TrainHooks | None = None, run_token: str = "") -> TrainResult:
    """Train a VAE on ``train_set``, validating on ``val_set`` each epoch; resumable.

    ``run_token`` marks this run's checkpoints; ``--resume`` continues only a matching one.
    """
    loop = _start(cfg, train_set, val_set, run_token)
    bar = tqdm(range(loop.state.epoch + 1, loop.cfg.epochs + 1), desc="train", unit="epoch",
               initial=loop.state.epoch, total=loop.cfg.epochs, disable=None)
    for epoch in bar:
        stats = _epoch(loop, epoch)
        _show(bar, stats, loop.cfg.epochs)
        _keep(loop, epoch, stats, hooks)
    bar.close()
    return _finish(loop)


@dataclass
class TrainingState:
    """Loop bookkeeping that a checkpoint must restore."""

    history: list[dict[str, float]]
    run_token: str = ""
    schedule_epochs: int = 0  # the --epochs the learning-rate schedule was laid out for
    epoch: int = 0
    best_epoch: int = 0
    best_val_loss: float = math.inf

    def restore(self, ckpt: dict) -> None:
        self.history, self.epoch = list(ckpt["history"]), ckpt["epoch"]
        self.best_epoch, self.best_val_loss = ckpt["best_epoch"], ckpt["best_val_loss"]


class ValFrames(NamedTuple):
    """Validation frames and the index of each one's game, on the training device."""

    frames_uint8: torch.Tensor  # (N, 3, 64, 64) uint8
    game_ids: torch.Tensor  # (N,) int64


@dataclass
class _Loop:
    """What every epoch of one ``fit`` works on."""

    cfg: TrainConfig  # with the planned --epochs
    out: Path
    device: torch.device
    dtype: torch.dtype
    model: VAE
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    order_rng: torch.Generator
    backward: Callable[[torch.Tensor], LossTerms]
    game_ids: torch.Tensor  # (N,) the training frames' game index, on the CPU
    frame_weights: torch.Tensor | None  # (N,) sampling weights, None: uniform
    val: ValFrames
    refs: GameReferences
    state: TrainingState


def _start(cfg: TrainConfig, train_set: FrameSet, val_set: FrameSet, run_token: str) -> _Loop:
    """A new run's model, optimizer, schedule and frame order, or those its checkpoint holds."""
    device = resolve_device(cfg.device)
    dtype = resolve_precision(cfg.precision, device)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in remove_partial_files(out):
        log.info("removed %s, left half-written by an earlier run that was killed", stale.name)
    seed_everything(cfg.seed)
    log.info("training on %s (%s), %d train / %d val frames", device, str(dtype).split(".")[-1],
             len(train_set), len(val_set))
    frames, game_ids = train_set.frames_uint8.to(device), train_set.game_ids.to(device)
    refs = game_references(train_set.frames_uint8, train_set.game_ids,
                           len(train_set.games)).to(device)
    model = _initialised(cfg, train_set, frames, game_ids, refs, device)
    optimizer = _optimizer(model, cfg, device)
    path, ckpt = read_checkpoint(out, cfg, run_token) if cfg.resume else (out, None)
    cfg = planned(cfg, train_set, ckpt["config"]["epochs"] if ckpt else None)
    state = TrainingState(history=[], run_token=run_token,
                          schedule_epochs=schedule_epochs(ckpt) if ckpt else cfg.epochs)
    scheduler = _scheduler(optimizer, state.schedule_epochs,
                           steps_per_epoch(train_set, cfg.batch_size))
    order_rng = torch.Generator().manual_seed(cfg.seed)
    frame_weights = (_object_weights(frames, game_ids, refs, cfg.object_oversample)
                     if cfg.object_oversample != 1 else None)
    if ckpt:
        restore_checkpoint(path, ckpt, model, optimizer, scheduler, order_rng)
        state.restore(ckpt)
    return _Loop(cfg, out, device, dtype, model, optimizer, scheduler, order_rng,
                 backward_step(model, frames, game_ids, refs, cfg, dtype), train_set.game_ids,
                 frame_weights, ValFrames(val_set.frames_uint8.to(device),
                                          val_set.game_ids.to(device)), refs, state)


def _initialised(cfg: TrainConfig, train_set: FrameSet, frames: torch.Tensor,
                 game_ids: torch.Tensor, refs: GameReferences, device: torch.device) -> VAE:
    """A new VAE whose output starts at the background and whose mask head starts at each
    pixel's foreground rate."""
    # The loss and the metrics take each frame's own game's background and mean frame; the
    # output bias is one image for all games, so it starts from the median over them all.
    background = (refs.backgrounds if len(train_set.games) == 1
                  else median_background(train_set.frames_uint8).to(device))
    model = _placed(build_model(cfg), device)
    model.init_output_bias(background)
    if model.mask is not None:
        model.init_mask_bias(foreground_rate(frames, refs.backgrounds, game_ids))
    return model


def _scheduler(optimizer: torch.optim.Optimizer, epochs: int,
               per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up over the first pass, then ``schedule.lr_factor`` over ``epochs`` passes."""
    # The schedule is the one the run started with; epochs added on resume run at its end rate.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, total_steps=epochs * per_epoch,
                                     warmup_steps=per_epoch))


def _epoch(loop: _Loop, epoch: int) -> dict[str, float]:
    """One pass over the training frames, then validation; the epoch's figures."""
    started = time.perf_counter()
    loop.model.train()
    train_stats = _train_epoch(loop.backward, loop.optimizer, loop.scheduler, loop.game_ids,
                               loop.cfg, loop.order_rng, loop.device, loop.frame_weights)
    val_stats = _validate(loop.model, loop.val, loop.refs, loop.cfg, loop.dtype)
    stats = {"epoch": epoch, **train_stats, **val_stats,
             "lr": loop.scheduler.get_last_lr()[0],
             "epoch_seconds": time.perf_counter() - started}
    loop.state.history.append(stats)
    _check_finite(stats, epoch)
    return stats


def _show(bar: tqdm, stats: dict[str, float], epochs: int) -> None:
    """The epoch on the progress bar, or in the log where there is no terminal to draw it."""
    bar.set_postfix(loss=f"{stats['train_loss']:.1f}", val=f"{stats['val_loss']:.1f}",
                    psnr=f"{stats['val_psnr']:.1f}")
    if bar.disable:
        log.info("epoch %d/%d  train %.2f  val %.2f (recon %.2f, kl %.2f)  psnr %.2f dB  %.1fs",
                 stats["epoch"], epochs, stats["train_loss"], stats["val_loss"],
                 stats["val_recon"], stats["val_kl"], stats["val_psnr"], stats["epoch_seconds"])


def _keep(loop: _Loop, epoch: int, stats: dict[str, float], hooks: TrainHooks | None) -> None:
    """Save the best model so far, tell the hooks, and checkpoint when it is time."""
    state = loop.state
    if stats["val_loss"] < state.best_val_loss:
        state.best_val_loss, state.best_epoch = stats["val_loss"], epoch
        save_atomic(loop.model.state_dict(), loop.out / "best_model.pt")
    state.epoch = epoch
    if hooks:
        hooks.on_epoch_end(epoch, stats)
    if epoch % loop.cfg.checkpoint_freq == 0 or epoch == loop.cfg.epochs:
        files = _checkpoint(loop, epoch)
        if hooks:
            hooks.on_checkpoint(epoch, files)


def _placed(model: VAE, device: torch.device) -> VAE:
    """``model`` on ``device``, its weights channels_last on a CPU."""
    model = model.to(device)
    if device.type == "cpu":
        # channels_last against contiguous weights, bench.py's train section on 2 threads:
        # bf16 +7-16 % on Intel Xeons with AMX (Breakout's passes 18 % shorter on one), level
        # on AMD Zen 4/5; fp32 +9 % on a Zen 1, level on the other AMD CPUs, slower only on
        # the Xeons' capped AVX2 path.
        model = model.to(memory_format=torch.channels_last)
    return model


def _optimizer(model: VAE, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam; with --weight_decay, decoupled decay (AdamW) of the ``weight`` tensors only, as
    nanoGPT does: decaying ``output_bias`` would pull the picture off the background frame."""
    params: list = list(model.parameters())
    if cfg.weight_decay:  # without, one group as before: older checkpoints still resume
        named = list(model.named_parameters())
        params = [{"params": [p for n, p in named if n.endswith(".weight")],
                   "weight_decay": cfg.weight_decay},
                  {"params": [p for n, p in named if not n.endswith(".weight")]}]
    # One fused kernel instead of ~10 ops per parameter: +2-4 % images/s on CPU (measured).
    return torch.optim.Adam(params, lr=cfg.lr, decoupled_weight_decay=bool(cfg.weight_decay),
                            fused=device.type in ("cpu", "cuda"))


def _batches(val: ValFrames, refs: GameReferences, batch_size: int):
    """(float frames, their mean frames, their backgrounds), ``batch_size`` at a time."""
    for start in range(0, len(val.frames_uint8), batch_size):
        rows = slice(start, start + batch_size)
        yield to_float(val.frames_uint8[rows]), *refs.of(val.game_ids[rows])


@torch.no_grad()
def _object_weights(frames: torch.Tensor, game_ids: torch.Tensor, refs: GameReferences,
                    oversample: float) -> torch.Tensor:
    """(N,) cpu sampling weight of each frame: ``oversample`` where its pixels show a small
    moving object (``losses.small_objects``), else 1."""
    shows = []
    for x, mean_frame, background in _batches(ValFrames(frames, game_ids), refs, EVAL_BATCH):
        small, _ = small_objects(x, background, usually_empty(mean_frame, background))
        shows.append(small.flatten(1).amax(1).cpu() > 0)
    shows = torch.cat(shows)
    log.info("%.1f%% of the training frames show a small moving object; drawn %gx as often",
             100 * shows.float().mean().item(), oversample)
    return 1 + (oversample - 1) * shows.double()


def _train_epoch(backward, optimizer, scheduler, game_ids, cfg, order_rng, device,
                 frame_weights=None) -> dict[str, float]:
    order = balanced_order(game_ids, order_rng, frame_weights).to(device)
    sums = torch.zeros(3, device=device)  # accumulated on device: no per-step host sync
    for start in range(0, len(order), cfg.batch_size):
        index = order[start:start + cfg.batch_size]
        terms = backward(index)
        optimizer.step()
        scheduler.step()
        sums += torch.stack([t.detach() for t in terms]) * len(index)
    total, recon, kl = (sums / len(order)).tolist()
    return {"train_loss": total, "train_recon": recon, "train_kl": kl}


@torch.no_grad()
def _validate(model, val: ValFrames, refs: GameReferences, cfg, dtype) -> dict[str, float]:
    """Validation loss terms (z = posterior mean) and the classic metrics on held-out episodes."""
    model.eval()
    sums = torch.zeros(3, device=val.frames_uint8.device)
    scorer = Scorer(count_objects=False)  # the epoch's figures do not include object recall
    for x, mean_frame, background in _batches(val, refs, EVAL_BATCH):
        terms, x_hat = loss_terms(model, x, mean_frame, background, cfg, dtype)
        sums += torch.stack(list(terms)) * len(x)
        scorer.update(x_hat.float(), x, mean_frame, background)
    metrics = scorer.compute()
    total, recon, kl = (sums / len(val.frames_uint8)).tolist()
    return {"val_loss": total, "val_recon": recon, "val_kl": kl,
            "val_psnr": metrics["psnr"], "val_accuracy": metrics["accuracy"],
            "val_fg_accuracy": metrics["fg_accuracy"], "val_fg_psnr": metrics["fg_psnr"],
            "baseline_psnr": metrics["baseline_psnr"]}


def _check_finite(stats: dict[str, float], epoch: int) -> None:
    bad = [k for k in ("train_loss", "val_loss") if not math.isfinite(stats[k])]
    if bad:
        raise NonFiniteLossError(
            f"{bad[0]} became {stats[bad[0]]} at epoch {epoch}; try a lower --lr or "
            f"--precision fp32")


@torch.no_grad()
def _preview(model: VAE, val_frames: torch.Tensor, path: Path, title: str) -> Path:
    model.eval()
    index = torch.linspace(0, len(val_frames) - 1, N_PREVIEW).long()
    x = to_float(val_frames[index.to(val_frames.device)])
    return plots.reconstructions(x, model(x)[0], path, title)


def _final_preview(out: Path, model: VAE, epoch: int, val_frames: torch.Tensor) -> Path:
    """final_reconstructions.png: a copy of the last checkpoint's, which drew this model."""
    path, last = out / "final_reconstructions.png", out / f"reconstructions_epoch_{epoch}.png"
    if not last.exists():
        return _preview(model, val_frames, path, "validation frames, final model")
    with atomic_path(path) as tmp:
        shutil.copyfile(last, tmp)
    return path


def _checkpoint(loop: _Loop, epoch: int) -> list[Path]:
    """Full training state (tensors and plain types only: loadable with weights_only=True)."""
    state = loop.state
    ckpt = {
        "epoch": epoch,
        "model": loop.model.state_dict(),
        "optimizer": loop.optimizer.state_dict(),
        "scheduler": loop.scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "order_rng": loop.order_rng.get_state(),
        "best_epoch": state.best_epoch,
        "best_val_loss": state.best_val_loss,
        "history": state.history,
        "config": dataclasses.asdict(loop.cfg),
        "loss_version": LOSS_VERSION,
        "run_token": state.run_token,
        "schedule_epochs": state.schedule_epochs,
        "precision": PRECISION_NAMES[loop.dtype],
    }
    path = loop.out / f"checkpoint_epoch_{epoch}.pt"
    save_atomic(ckpt, path)
    image = _preview(loop.model, loop.val.frames_uint8,
                     loop.out / f"reconstructions_epoch_{epoch}.png",
                     f"validation frames, epoch {epoch}")
    return [path, image]


def _finish(loop: _Loop) -> TrainResult:
    """Save the final model and plots, then score the best model on the validation frames."""
    out, state = loop.out, loop.state
    save_atomic(loop.model.state_dict(), out / "final_model.pt")
    files = {
        "final_model": out / "final_model.pt",
        "best_model": out / "best_model.pt",
        "training_curves": plots.training_curves(state.history, out / "training_curves.png"),
        "final_reconstructions": _final_preview(out, loop.model, state.epoch,
                                                loop.val.frames_uint8),
    }
    best = build_model(loop.cfg).to(loop.device)
    best.load_state_dict(torch.load(out / "best_model.pt", map_location=loop.device,
                                    weights_only=True))
    best.eval()
    with torch.no_grad():
        val_metrics = score(lambda x: best(x)[0], _batches(loop.val, loop.refs, EVAL_BATCH))
    return TrainResult(best, state.best_epoch, state.best_val_loss, val_metrics, state.history,
                       files)
