"""One training step's objective: every loss term the flags turn on, read from the model's
heads, and the backward pass that leaves its clipped gradients in ``.grad``. The loop that
drives it, and the validation that reuses the same terms, are ``train``'s concern."""

from __future__ import annotations

from collections.abc import Callable

import torch

from atari_vae.config import TrainConfig
from atari_vae.cuda_graph import GraphedBackward, wants_cuda_graph
from atari_vae.envs import FRAME_SHAPE, to_float
from atari_vae.losses import (
    LossTerms,
    coordinate_error,
    foreground_mask,
    fourier_error,
    locator_error,
    mask_error,
    object_error,
    pixel_weights,
    small_objects,
    usually_empty,
    vae_loss,
)
from atari_vae.metrics import GameReferences
from atari_vae.model import VAE
from atari_vae.runtime import autocast

# Typical gradient norms at the default loss scale are 30-100 (measured on Pong); rare spikes of
# 10x that sent the KL to 10^4 nats and cost half a 15-epoch run. Clipping caps the spikes only.
GRAD_CLIP_NORM = 100.0


def build_model(cfg: TrainConfig) -> VAE:
    """The VAE ``cfg`` trains, with the heads its loss weights turn on."""
    return VAE(FRAME_SHAPE, cfg.latent_dim, cfg.decoder, locator=cfg.loc_weight > 0,
               coords=cfg.coord_weight > 0, mask=cfg.mask_weight > 0,
               base_channels=cfg.base_channels, fourier=cfg.fourier_weight > 0)


def loss_terms(model: VAE, x: torch.Tensor, mean_frame: torch.Tensor,
               background: torch.Tensor, cfg: TrainConfig,
               dtype: torch.dtype) -> tuple[LossTerms, torch.Tensor]:
    """(the training objective (``losses`` docstring) for frames of these references, x_hat);
    z is sampled in training mode and the posterior mean in eval mode. The state heads read the
    posterior mean, which is what a planner and the state probe read."""
    with autocast(x.device, dtype):
        mu, logvar = model.encode(x)
        x_hat = model.decode(model.reparameterize(mu, logvar))
        where_logits = model.locate(mu) if cfg.loc_weight else None
        points = model.point(mu) if cfg.coord_weight else None
        waves = model.waves(mu) if cfg.fourier_weight else None
        mask_logits = model.foreground_logits(mu) if cfg.mask_weight else None
    fg = foreground_mask(x, background)  # one pass for every term that needs it
    weights = pixel_weights(x, background, cfg.fg_weight, x_hat, fg)
    extra = 0.0
    finds_ball = cfg.loc_weight or cfg.coord_weight or cfg.fourier_weight
    if cfg.obj_weight or finds_ball:
        region = usually_empty(mean_frame, background)
    if cfg.obj_weight:
        extra = extra + cfg.obj_weight * object_error(x_hat, x, background, region)
    if finds_ball:
        small, _ = small_objects(x, background, region, fg)  # the ball's pixels, found once
    if cfg.loc_weight:
        extra = extra + cfg.loc_weight * locator_error(where_logits, small)
    if cfg.coord_weight:
        extra = extra + cfg.coord_weight * coordinate_error(points, model.coords_log_px, small)
    if cfg.fourier_weight:
        extra = extra + cfg.fourier_weight * fourier_error(
            waves, model.fourier_log_scale, small, x, background, model.fourier_periods_px)
    if cfg.mask_weight:
        extra = extra + cfg.mask_weight * mask_error(mask_logits, x, background, fg)
    return vae_loss(x_hat, x, mu, logvar, weights, cfg.kl_weight, cfg.free_bits, extra), x_hat


def backward_step(model: VAE, frames: torch.Tensor, game_ids: torch.Tensor,
                  refs: GameReferences, cfg: TrainConfig,
                  dtype: torch.dtype) -> Callable[[torch.Tensor], LossTerms]:
    """``(index) -> loss terms`` of the frames at ``index``, their gradients in the parameters'
    ``.grad`` (clipped); replayed as a CUDA graph where ``--cuda_graph`` allows."""
    def backward(index: torch.Tensor) -> LossTerms:
        x = to_float(frames[index])
        terms, _ = loss_terms(model, x, *refs.of(game_ids[index]), cfg, dtype)
        terms.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
        return terms

    if wants_cuda_graph(cfg.cuda_graph, frames.device):
        return GraphedBackward(backward, list(model.parameters()), cfg.batch_size)

    def eager(index: torch.Tensor) -> LossTerms:
        model.zero_grad(set_to_none=True)
        return backward(index)
    return eager
