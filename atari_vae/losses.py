"""The ELBO terms and their weights.

Negative ELBO as in Kingma & Welling (2014), Appendix B, with a Gaussian decoder of unit
variance (so reconstruction is a sum of squared errors up to constants):

    loss = sum_pixels w * (x_hat - x)^2  +  obj_weight * O(x_hat, x)
           -  loc_weight * log p(where | mu)  -  coord_weight * log N(where; C mu + c, s^2 I)
           -  fourier_weight * log N(waves(where); F mu + f, r^2 I)
           -  mask_weight * sum_pixels log Bernoulli(fg; sigmoid(M mu + m))
           +  kl_weight * sum_j max(free_bits, KL_j)
    KL_j = -0.5 * (1 + logvar_j - mu_j^2 - exp(logvar_j))

All sums are per image (3x64x64 values; latent dims), averaged over the batch. ``w`` is 1 on
background pixels and ``fg_weight`` where the target or the reconstruction differs from the
training set's background (``pixel_weights``). ``O`` (``object_error``) compares where the two
images differ from the background near the frame's small objects (ball, shots), blurred at a
few scales. ``p(where | mu)`` (``locator_error``) is the VAE's locator: a categorical over
pixel positions of those small objects, linear in the posterior mean, so the mean must say
where they are; the coordinate head (``coordinate_error``) asks a line from the mean for the
(row, col) of the one small object in view (a Gaussian of learned scale s), so it says so in the
form a planner reads; the Fourier head (``fourier_error``) asks a line from the mean for the
cos and sin of that position at a few periods down to 4 pixels, a code in which a linear
classifier tells one pixel from the next (which it cannot on a line). The mask head
(``mask_error``) asks a line from the mean for the frame's whole foreground mask ``fg``
(paddle, ball, removed bricks), pixel by pixel.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.nn import functional as nn_f

FG_THRESHOLD = 0.1
# Where the ball-finding terms look: stricter than the object metric's RARE_DEVIATION (0.02),
# which still let a lives-digit fragment in, a small object in most Breakout frames; the ball
# passes each pixel in under 1 % of frames.
EMPTY_DEVIATION = 0.005
OBJECT_SCALES_PX = (1.0, 2.0, 4.0)
OBJECT_REACH_PX = 6  # how far from a small object a drawn one still earns the object term
# A ball or bullet is 1-4 pixels at 64x64 (Breakout's 2x4 ball, Pong's 2x4 ball, Space
# Invaders' 1x8 shots become 1x1 to 1x3); the paddle, invaders and digits are larger.
SMALL_OBJECT_MAX_PIXELS = 4
# A foreground pixel this close (px, along both axes) to a crowded one is not small: a paddle's
# uncrowded end pixels are at most two pixels from its crowded middle.
CROWD_REACH_PX = 2
# One object in view: the small pixels' mean squared distance from their centroid is at most
# this (a 1x4 shot: 1.25 px^2); two balls a few pixels apart are well above it.
ONE_OBJECT_SPREAD_PX2 = 2.0
MIN_COORD_SCALE_PX = 0.25  # the centroid itself is only known to about this
MIN_FOURIER_SCALE = 0.05  # floor of the learned scale: the pull on a wave (1 / scale^2) <= 400


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
                  x_hat: torch.Tensor | None = None,
                  fg: torch.Tensor | None = None) -> torch.Tensor:
    """(N, 1, H, W) weights: ``fg_weight`` where target or reconstruction is foreground, else 1.

    Weighting the reconstruction's foreground too makes a hedged object (a faint paddle smeared
    along its row or column) as costly as a missing one. On the reconstruction side the weight
    ramps up with the deviation from the background, so faint smears under the 0.1 threshold
    are not free either. ``fg``: ``foreground_mask(x, background)`` if the caller has it.
    """
    fg = (foreground_mask(x, background) if fg is None else fg).to(x.dtype)
    if x_hat is not None:
        deviation = (x_hat.detach().float() - background).abs().amax(dim=1, keepdim=True)
        fg = torch.maximum(fg, (deviation / FG_THRESHOLD).clamp(max=1.0))
    return 1.0 + (fg_weight - 1.0) * fg


def usually_empty(mean_frame: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """(G, 1, H, W) float mask of pixels where the mean frame stays within EMPTY_DEVIATION of
    the background: where balls and shots fly, not where bricks, digits or paddles sit."""
    return ((mean_frame - background).abs().amax(dim=1, keepdim=True)
            <= EMPTY_DEVIATION).float()


def _separable_filter(image: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) filtered by ``taps`` (odd length) along both axes, zero-padded.

    As two matrix products with banded matrices: on CPU 25x faster than a one-channel conv2d.
    """
    radius = (len(taps) - 1) // 2

    def band(size: int) -> torch.Tensor:
        offset = torch.arange(size, device=image.device).view(1, -1) - torch.arange(
            size, device=image.device).view(-1, 1)
        inside = offset.abs() <= radius
        return torch.where(inside, taps[(offset + radius).clamp(0, len(taps) - 1)], 0.0)

    return band(image.shape[-2]) @ image @ band(image.shape[-1]).T


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, 1, H, W) blurred by a separable Gaussian of ``sigma`` px, zero-padded."""
    radius = math.ceil(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, device=image.device, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return _separable_filter(image, kernel / kernel.sum())


def small_objects(x: torch.Tensor, background: torch.Tensor, region: torch.Tensor,
                  fg: torch.Tensor | None = None,
                  crowd_reach_px: int = CROWD_REACH_PX) -> tuple[torch.Tensor, torch.Tensor]:
    """(small, large): (N, 1, H, W) float masks of ``x``'s foreground pixels in small objects
    (at most SMALL_OBJECT_MAX_PIXELS foreground pixels in a 5x5 neighbourhood, none of them
    within ``crowd_reach_px`` of a crowded pixel, inside ``region``) and of the rest of its
    foreground (paddles, bricks, digits); ``fg`` as in ``pixel_weights``."""
    fg = (foreground_mask(x, background) if fg is None else fg).float()
    box = torch.ones(5, device=x.device)
    crowded = fg * (_separable_filter(fg, box) > SMALL_OBJECT_MAX_PIXELS + 0.5)
    reach = torch.ones(2 * crowd_reach_px + 1, device=x.device)
    small = fg * region * (_separable_filter(crowded, reach) < 0.5)
    return small, fg - small


def small_object_window(x: torch.Tensor, background: torch.Tensor,
                        region: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) float: pixels within OBJECT_REACH_PX of a small object of ``x``, minus
    the surroundings of its larger objects (the paddle)."""
    small, large = small_objects(x, background, region)
    reach = 2 * OBJECT_REACH_PX + 1
    near_large = nn_f.max_pool2d(large, 3, stride=1, padding=1)
    return nn_f.max_pool2d(small, reach, stride=1, padding=OBJECT_REACH_PX) * (1 - near_large)


def locator_error(logits: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """(N,) cross-entropy of the locator's categorical over pixel positions (``logits``
    (N, H*W)) against where the frames' small objects are (``small``, the first mask of
    ``small_objects``, blurred by 1 px, normalised); 0 for frames without one. Unlike a squared
    error it pulls as hard when the guess is far off."""
    where = _gaussian_blur(small, 1.0).flatten(1)
    mass = where.sum(dim=1, keepdim=True)
    target = where / mass.clamp(min=1e-8)
    return -(target * nn_f.log_softmax(logits.float(), dim=1)).sum(dim=1)


def object_error(x_hat: torch.Tensor, x: torch.Tensor, background: torch.Tensor,
                 region: torch.Tensor) -> torch.Tensor:
    """(N,) multi-scale error between where ``x_hat`` and ``x`` leave the background around
    the small objects of ``x`` (``small_object_window``; ``region``: ``usually_empty``).

    A one-pixel ball drawn a pixel or two off costs less than one left out (the plain squared
    error charges a near miss twice), which gives the decoder and the encoder a slope towards
    its position. Each scale is scaled by 4*pi*sigma^2, so an isolated pixel's error costs
    about what it costs unblurred.
    """
    window = small_object_window(x, background, region)

    def presence(image: torch.Tensor) -> torch.Tensor:
        return (image.float() - background).abs().amax(dim=1, keepdim=True) * window

    residual = presence(x_hat) - presence(x)
    total = x.new_zeros(len(x))
    for sigma in OBJECT_SCALES_PX:
        blurred = _gaussian_blur(residual, sigma)
        total = total + 4 * math.pi * sigma**2 * blurred.pow(2).sum(dim=(1, 2, 3))
    return total


def one_object_centre(small: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """((N, 2) centroid (row, col) in pixels of the pixels in ``small`` (N, 1, H, W), (N,) bool
    whether they form one object: some pixels, within ONE_OBJECT_SPREAD_PX2 of the centroid)."""
    mass = small.sum(dim=(1, 2, 3))
    rows = torch.arange(small.shape[-2], device=small.device, dtype=small.dtype).view(1, 1, -1, 1)
    cols = torch.arange(small.shape[-1], device=small.device, dtype=small.dtype).view(1, 1, 1, -1)
    weight = small / mass.clamp(min=1e-6).view(-1, 1, 1, 1)
    centre = torch.stack([(weight * rows).sum(dim=(1, 2, 3)),
                          (weight * cols).sum(dim=(1, 2, 3))], dim=1)
    spread = (weight * ((rows - centre[:, 0].view(-1, 1, 1, 1)).pow(2)
                        + (cols - centre[:, 1].view(-1, 1, 1, 1)).pow(2))).sum(dim=(1, 2, 3))
    return centre, (mass > 0) & (spread <= ONE_OBJECT_SPREAD_PX2)


def coordinate_error(points: torch.Tensor, log_px: torch.Tensor,
                     small: torch.Tensor) -> torch.Tensor:
    """(N,) negative log-likelihood (nats, up to a constant) of the centroid of the frames'
    small objects (``small``: (N, 1, H, W), the first mask of ``small_objects``) under an
    isotropic Gaussian at ``points`` (N, 2) (row, col) of scale exp(``log_px``) pixels, on
    frames where they form one (ONE_OBJECT_SPREAD_PX2); 0 elsewhere.

    A squared error alone charged a far-off early guess ~1000 units a frame and starved the
    pixels (PSNR at the mean frame's after an epoch); with the scale learned, the pull grows as
    the guess gets good, and its range in nats is the locator's.
    """
    centre, one = one_object_centre(small)
    log_px = log_px.float().clamp(min=math.log(MIN_COORD_SCALE_PX))
    nll = (points.float() - centre).pow(2).sum(dim=1) / (2 * torch.exp(2 * log_px)) + 2 * log_px
    return torch.where(one, nll, 0.0)


def fourier_code(centre: torch.Tensor, periods_px: torch.Tensor) -> torch.Tensor:
    """(N, 2) (row, col) in pixels -> (N, 4 * P): cos then sin of each axis at each of the
    P ``periods_px``, laid out (axis, cos/sin, period)."""
    angle = 2 * math.pi * centre.float().unsqueeze(-1) / periods_px.float()  # (N, 2, P)
    return torch.stack([angle.cos(), angle.sin()], dim=2).flatten(1)


def fourier_error(waves: torch.Tensor, log_scale: torch.Tensor, small: torch.Tensor,
                  x: torch.Tensor, background: torch.Tensor,
                  periods_px: torch.Tensor) -> torch.Tensor:
    """(N,) Gaussian negative log-likelihood (nats above its floor, so >= 0) of the Fourier code
    of ``x``'s one small object (``small``, as ``coordinate_error``) under ``waves`` (N, 4P) of
    scale exp(``log_scale``); 0 on frames without exactly one."""
    _, one = one_object_centre(small)
    # Each pixel weighted by its distance from the background: how a 64x64 frame keeps the
    # ball's place between pixels (the area resize blends its edge into the backdrop).
    intensity = (x.float() - background).abs().amax(dim=1, keepdim=True)
    centre, _ = one_object_centre(small * intensity)
    target = fourier_code(centre, periods_px)
    log_scale = log_scale.float().clamp(min=math.log(MIN_FOURIER_SCALE))
    nll = ((waves.float() - target).pow(2).sum(dim=1) / (2 * torch.exp(2 * log_scale))
           + target.shape[1] * (log_scale - math.log(MIN_FOURIER_SCALE)))
    return torch.where(one, nll, 0.0)


def mask_error(logits: torch.Tensor, x: torch.Tensor, background: torch.Tensor,
               fg: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) binary cross-entropy in nats, summed over pixels, of the mask head's ``logits``
    (N, H*W) against ``x``'s foreground mask (``foreground_mask``, or ``fg`` if given)."""
    target = (foreground_mask(x, background) if fg is None else fg).flatten(1).float()
    return nn_f.binary_cross_entropy_with_logits(logits.float(), target,
                                                 reduction="none").sum(dim=1)


def foreground_rate(frames_uint8: torch.Tensor, backgrounds: torch.Tensor,
                    game_ids: torch.Tensor, max_frames: int = 4096) -> torch.Tensor:
    """(1, 1, H, W): the share of ``frames_uint8`` (N, 3, H, W), up to ``max_frames`` evenly
    spaced, in which each pixel is foreground against its own game's background
    (``backgrounds`` (n_games, 3, H, W), indexed by ``game_ids`` (N,))."""
    rows = torch.linspace(0, len(frames_uint8) - 1, min(len(frames_uint8), max_frames)).long()
    total = torch.zeros(1, 1, *frames_uint8.shape[-2:], device=backgrounds.device)
    for chunk in rows.to(backgrounds.device).split(512):
        x = frames_uint8[chunk].float() / 255.0
        background = backgrounds[game_ids[chunk]]
        total += foreground_mask(x, background).float().sum(dim=0, keepdim=True)
    return total / len(rows)


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) per latent dim, averaged over the batch: (latent_dim,)."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).mean(dim=0)


def vae_loss(x_hat: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             weights: torch.Tensor | float = 1.0, kl_weight: float = 1.0,
             free_bits: float = 0.0, extra_recon: torch.Tensor | float = 0.0) -> LossTerms:
    """Weighted negative ELBO for a batch; see the module docstring for the formula.

    ``extra_recon``: the weighted state terms per image (N,) (obj_weight * object_error +
    loc_weight * locator_error + coord_weight * coordinate_error + fourier_weight *
    fourier_error + mask_weight * mask_error), or 0 when all are off.
    """
    recon = ((weights * (x_hat.float() - x).pow(2)).sum(dim=(1, 2, 3))
             + extra_recon).mean()
    kl_dims = kl_per_dim(mu.float(), logvar.float())
    kl = kl_dims.sum()
    penalised = kl_dims.clamp(min=free_bits).sum() if free_bits > 0 else kl
    return LossTerms(recon + kl_weight * penalised, recon, kl)
