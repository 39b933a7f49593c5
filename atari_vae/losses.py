"""The ELBO terms and their weights.

Negative ELBO as in Kingma & Welling (2014), Appendix B, with a Gaussian decoder of unit
variance (so reconstruction is a sum of squared errors up to constants):

    loss = sum_pixels w * (x_hat - x)^2  +  kl_weight * sum_j max(free_bits, KL_j)
    KL_j = -0.5 * (1 + logvar_j - mu_j^2 - exp(logvar_j))

Both sums are per image (3x64x64 values; latent dims), averaged over the batch. ``w`` is 1 on
background pixels and ``fg_weight`` where the target or the reconstruction differs from the
training set's background (``pixel_weights``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

FG_THRESHOLD = 0.1


class LossTerms(NamedTuple):
    """Batch means per image: total = recon + kl_weight * (free-bits-clamped) kl."""

    total: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor


def foreground_mask(x: torch.Tensor, background: torch.Tensor,
                    threshold: float = FG_THRESHOLD) -> torch.Tensor:
    """(N, 1, H, W) bool: pixels where any channel differs from ``background`` by > threshold."""
    return ((x - background).abs() > threshold).any(dim=1, keepdim=True)


def pixel_weights(x: torch.Tensor, background: torch.Tensor, fg_weight: float,
                  x_hat: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 1, H, W) weights: ``fg_weight`` where target or reconstruction is foreground, else 1.

    Weighting the reconstruction's foreground too makes a hedged object (a faint paddle smeared
    along its row or column) as costly as a missing one. On the reconstruction side the weight
    ramps up with the deviation from the background, so faint smears under the 0.1 threshold
    are not free either.
    """
    fg = foreground_mask(x, background).to(x.dtype)
    if x_hat is not None:
        deviation = (x_hat.detach().float() - background).abs().amax(dim=1, keepdim=True)
        fg = torch.maximum(fg, (deviation / FG_THRESHOLD).clamp(max=1.0))
    return 1.0 + (fg_weight - 1.0) * fg


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) per latent dim, averaged over the batch: (latent_dim,)."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).mean(dim=0)


def vae_loss(x_hat: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             weights: torch.Tensor | float = 1.0, kl_weight: float = 1.0,
             free_bits: float = 0.0) -> LossTerms:
    """Weighted negative ELBO for a batch; see the module docstring for the formula."""
    recon = (weights * (x_hat.float() - x).pow(2)).sum(dim=(1, 2, 3)).mean()
    kl_dims = kl_per_dim(mu.float(), logvar.float())
    kl = kl_dims.sum()
    penalised = kl_dims.clamp(min=free_bits).sum() if free_bits > 0 else kl
    return LossTerms(recon + kl_weight * penalised, recon, kl)
