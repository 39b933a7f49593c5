"""Reconstruction metrics: classic (MSE, PSNR, accuracy), foreground, and the mean-frame baseline.

All images are (N, 3, 64, 64) float in [0, 1]. Definitions:
- ``psnr`` = 10 * log10(1 / MSE) over every value; ``accuracy`` = share of values within 0.1.
- foreground pixels differ from the static background (per-pixel median of separate frames)
  by more than 0.1 in any channel; ``fg_*`` are the same measures over those pixels only.
- ``object_recall``: of the small moving objects in the target (8-connected foreground
  components of at most SMALL_OBJECT_MAX_PIXELS pixels, where the mean frame shows background:
  balls, bullets), the share the reconstruction shows at the right place, i.e. with a
  foreground pixel of its own within one pixel of the object.
- ``baseline_*``: the same measures for a "model" that always outputs the mean frame.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np
import torch

from atari_vae.envs import to_float
from atari_vae.losses import SMALL_OBJECT_MAX_PIXELS, foreground_mask
from atari_vae.store import FrameRows

ACCURACY_TOLERANCE = 0.1
METRIC_KEYS = ("mse", "psnr", "accuracy", "fg_mse", "fg_psnr", "fg_accuracy",
               "psnr_median", "psnr_p05", "object_recall")
RARE_DEVIATION = 0.02  # mean frame vs background: a spot that is usually background
# (0.05 let fragments of Breakout's score digit in, shown in a third of the frames)
# Components never connect across frames: a 3x3 neighbourhood within each frame only.
_PER_FRAME_3X3 = np.zeros((3, 3, 3), dtype=bool)
_PER_FRAME_3X3[1] = True


def small_object_labels(target: torch.Tensor, background: torch.Tensor,
                        mean_frame: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N, H, W) of the target's 8-connected foreground components, per-label bool
    "is a small moving object"); label 0 is the background.

    Small: at most SMALL_OBJECT_MAX_PIXELS pixels. Moving: every pixel is usually background,
    i.e. the mean frame there is within RARE_DEVIATION of the background; this leaves out the
    gaps of knocked-out bricks and changed score digits, which stay in place for many frames.
    """
    from scipy import ndimage

    target_fg = foreground_mask(target, background)[:, 0].cpu().numpy()
    labels, count = ndimage.label(target_fg, structure=_PER_FRAME_3X3)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    is_object = sizes <= SMALL_OBJECT_MAX_PIXELS
    if mean_frame is not None:
        usual = foreground_mask(mean_frame.to(target.device).expand_as(target), background,
                                RARE_DEVIATION)[:, 0].cpu().numpy()
        is_object &= np.bincount(labels[usual], minlength=count + 1) == 0
    is_object[0] = False
    return labels, is_object


def small_objects_found(recon: torch.Tensor, target: torch.Tensor, background: torch.Tensor,
                        mean_frame: torch.Tensor | None = None,
                        objects: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[int, int]:
    """(small moving objects in ``target``, how many of them ``recon`` shows within one pixel).

    An object (``small_object_labels``) counts as shown when the reconstruction's own
    foreground touches it or a pixel next to it (one pixel of displacement allowed);
    ``objects``: the target's ``small_object_labels`` when already found.
    """
    from scipy import ndimage

    labels, is_object = objects or small_object_labels(target, background, mean_frame)
    if not is_object.any():
        return 0, 0
    recon_fg = foreground_mask(recon.float(), background)[:, 0].cpu().numpy()
    near_recon = ndimage.binary_dilation(recon_fg, structure=_PER_FRAME_3X3)
    shown = np.unique(labels[near_recon & is_object[labels]])
    return int(is_object.sum()), int(len(shown))


def psnr_from_mse(mse: float) -> float:
    """Peak signal-to-noise ratio in dB for signals in [0, 1]."""
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


class ReconstructionMetrics:
    """Accumulates sums over batches so metrics cover any number of frames exactly."""

    def __init__(self) -> None:
        self.sq_err = self.values = self.within = 0.0
        self.fg_sq_err = self.fg_values = self.fg_within = 0.0
        self.frame_psnrs: list[torch.Tensor] = []
        self.frames = self.objects = self.objects_shown = 0

    def update(self, recon: torch.Tensor, target: torch.Tensor, background: torch.Tensor,
               mean_frame: torch.Tensor | None = None,
               objects: tuple[np.ndarray, np.ndarray] | None = None,
               count_objects: bool = True) -> None:
        """Add one batch of reconstructions and their targets (``mean_frame``, ``objects``: see
        ``small_objects_found``; ``count_objects=False`` leaves object recall out)."""
        sq = (recon.float() - target).pow(2)
        close = (sq <= ACCURACY_TOLERANCE**2).float()
        fg = foreground_mask(target, background).expand_as(sq).float()
        self.sq_err += sq.sum().item()
        self.values += sq.numel()
        self.within += close.sum().item()
        self.fg_sq_err += (sq * fg).sum().item()
        self.fg_values += fg.sum().item()
        self.fg_within += (close * fg).sum().item()
        frame_mse = sq.flatten(1).mean(1).clamp(min=1e-12)
        self.frame_psnrs.append(10.0 * torch.log10(1.0 / frame_mse))
        found, shown = (small_objects_found(recon, target, background, mean_frame, objects)
                        if count_objects else (0, 0))
        self.frames += len(target)
        self.objects += found
        self.objects_shown += shown

    def compute(self) -> dict[str, float]:
        """The metrics in METRIC_KEYS, the foreground share of pixels and small objects a frame."""
        mse = self.sq_err / self.values
        fg_mse = self.fg_sq_err / self.fg_values if self.fg_values else float("nan")
        psnrs = torch.cat(self.frame_psnrs)
        return {
            "mse": mse,
            "psnr": psnr_from_mse(mse),
            "accuracy": self.within / self.values,
            "fg_mse": fg_mse,
            "fg_psnr": psnr_from_mse(fg_mse) if self.fg_values else float("nan"),
            "fg_accuracy": self.fg_within / self.fg_values if self.fg_values else float("nan"),
            "fg_fraction": self.fg_values / self.values,
            "psnr_median": psnrs.median().item(),
            "psnr_p05": torch.quantile(psnrs, 0.05).item(),
            "object_recall": (self.objects_shown / self.objects if self.objects
                              else float("nan")),
            "objects_per_frame": self.objects / max(1, self.frames),
        }


def median_background(frames_uint8: torch.Tensor) -> torch.Tensor:
    """Per-pixel median of (up to 5000 evenly spaced) frames: (1, 3, 64, 64) float in [0, 1]."""
    sample = frames_uint8[torch.linspace(0, len(frames_uint8) - 1,
                                         min(len(frames_uint8), 5000)).long()]
    return to_float(sample.median(dim=0, keepdim=True).values)


def mean_frame_of(frames_uint8: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Mean frame, (1, 3, 64, 64) float in [0, 1], summed in chunks: a float copy of a
    default Pong collection (83,000 frames) would take 4 GB."""
    total = torch.zeros(1, *frames_uint8.shape[1:], dtype=torch.float64)
    for start in range(0, len(frames_uint8), chunk):
        total += to_float(frames_uint8[start:start + chunk]).sum(dim=0, keepdim=True)
    return (total / max(1, len(frames_uint8))).float()


def reference_frames(frames_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean frame, per-pixel median background), each (1, 3, 64, 64) float in [0, 1]."""
    return mean_frame_of(frames_uint8), median_background(frames_uint8)


class GameReferences(NamedTuple):
    """Each game's mean frame and median background, (n_games, 3, 64, 64) each."""

    means: torch.Tensor
    backgrounds: torch.Tensor

    def of(self, game_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean frames, backgrounds) of these frames' games: (1, 3, H, W) each for one game."""
        return per_frame(self.means, game_ids), per_frame(self.backgrounds, game_ids)

    def to(self, device: torch.device | str) -> GameReferences:
        return GameReferences(self.means.to(device), self.backgrounds.to(device))


def game_references(frames_uint8: torch.Tensor, game_ids: torch.Tensor,
                    n_games: int) -> GameReferences:
    """Each game's own mean frame and background: index them with ``game_ids``."""
    if n_games == 1:
        return GameReferences(*reference_frames(frames_uint8))
    parts = []
    for game in range(n_games):
        index = (game_ids == game).nonzero().squeeze(1)
        if len(index) == 0:
            raise ValueError(f"no frames of game {game} to take a background from")
        parts.append(reference_frames(FrameRows.of(frames_uint8, index)))  # no copy
    return GameReferences(*(torch.cat(column) for column in zip(*parts, strict=True)))


def per_frame(per_game: torch.Tensor, game_ids: torch.Tensor) -> torch.Tensor:
    """Each frame's game's image (a mean frame or background): ``per_game`` itself for one
    game, else (N, 3, H, W)."""
    return per_game if len(per_game) == 1 else per_game[game_ids]


class Scorer:
    """Model and mean-frame baseline metrics, accumulated batch by batch."""

    def __init__(self, count_objects: bool = True) -> None:
        """``count_objects=False``: no object recall (it labels every batch with scipy)."""
        self.model, self.baseline = ReconstructionMetrics(), ReconstructionMetrics()
        self.count_objects = count_objects

    def update(self, recon: torch.Tensor, target: torch.Tensor, mean_frame: torch.Tensor,
               background: torch.Tensor) -> None:
        """``mean_frame`` and ``background``: (1, 3, H, W), or one per frame (N, 3, H, W)
        when games are mixed."""
        background, mean_frame = background.to(target.device), mean_frame.to(target.device)
        count = self.count_objects
        # one labelling of the target, for both sides
        objects = small_object_labels(target, background, mean_frame) if count else None
        self.model.update(recon, target, background, mean_frame, objects, count)
        self.baseline.update(mean_frame.expand_as(target), target, background, mean_frame,
                             objects, count)

    def compute(self) -> dict[str, float]:
        """The model's METRIC_KEYS, fg_fraction and objects_per_frame, and the baseline's
        METRIC_KEYS as ``baseline_*``."""
        results = self.model.compute()
        results.update({f"baseline_{k}": v for k, v in self.baseline.compute().items()
                        if k in METRIC_KEYS})
        return results


def score(reconstruct: Callable[[torch.Tensor], torch.Tensor],
          batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Model metrics and ``baseline_*`` metrics of the mean frame, on the same batches.

    ``reconstruct`` maps a float batch to its reconstruction; ``batches`` yields (float batch,
    its mean frame, its background), as ``Scorer.update`` takes them.
    """
    scorer = Scorer()
    for x, mean_frame, background in batches:
        scorer.update(reconstruct(x), x, mean_frame, background)
    return scorer.compute()


def balanced_psnr(mse: float, fg_mse: float, fg_fraction: float) -> float:
    """PSNR of (foreground MSE + background MSE) / 2: objects and backdrop weigh the same.

    Background MSE is derived from the all-pixel ``mse`` and the foreground share of pixels.
    """
    if fg_fraction <= 0 or not math.isfinite(fg_mse):
        return psnr_from_mse(mse)
    bg_mse = max(mse - fg_fraction * fg_mse, 0.0) / (1.0 - fg_fraction)
    return psnr_from_mse(0.5 * (fg_mse + bg_mse))


def mean_balanced_psnr(per_game: Iterable[dict[str, float]]) -> float:
    """The tuning objective and the champion score, one definition: each game's balanced PSNR
    (from its ``mse``, ``fg_mse``, ``fg_fraction``), averaged so every game counts the same."""
    values = [balanced_psnr(m["mse"], m["fg_mse"], m["fg_fraction"]) for m in per_game]
    if not values:
        raise ValueError("no game metrics to average")
    return sum(values) / len(values)
