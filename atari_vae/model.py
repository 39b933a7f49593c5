"""The VAE: a convolutional encoder to (mu, logvar) and a decoder from z back to pixels.

Everything the decoder knows passes through z: there are no skip connections around the latent.
"""

from __future__ import annotations

import torch
from torch import nn

from atari_vae.config import DECODERS

STAGES = 4  # stride-2 convolutions: 64x64 -> 4x4
BROADCAST_CHANNELS = 64
# What VAE() was built with before a knob existed, for models saved before it: all 32-256 wide.
LEGACY_ARCHITECTURE = {"decoder": "deconv", "base_channels": 32, "locator": False,
                       "coords": False, "fourier": False, "mask": False}
# Periods in pixels of the Fourier head's waves: the longest spans the frame, the shortest tells
# neighbouring pixels apart; four per axis read the ball's byte as well as a one-hot of its
# pixel does (`benchmarks/probe.py codes`).
FOURIER_PERIODS_PX = (64.0, 25.4, 10.1, 4.0)


class BroadcastDecoder(nn.Module):
    """z tiled over a quarter-resolution grid beside the grid's x, y coordinates, two 3x3 convs,
    then two stride-2 deconvolutions to full-size logits (the spatial broadcast decoder of
    Watters et al. 2019): where an object is becomes a smooth function of z."""

    def __init__(self, latent_dim: int, out_channels: int, height: int, width: int):
        super().__init__()
        self.grid = (height // 4, width // 4)
        c = BROADCAST_CHANNELS
        self.net = nn.Sequential(
            nn.Conv2d(latent_dim + 2, c, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(c, c, 3, padding=1), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(c, c // 2, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.ConvTranspose2d(c // 2, out_channels, 4, stride=2, padding=1))
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, self.grid[0]),
                                torch.linspace(-1, 1, self.grid[1]), indexing="ij")
        self.register_buffer("coords", torch.stack([xs, ys]).unsqueeze(0), persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(N, latent_dim) -> (N, out_channels, H, W) logits."""
        tiled = z[:, :, None, None].expand(-1, -1, *self.grid)
        coords = self.coords.to(z.dtype).expand(len(z), -1, -1, -1)
        return self.net(torch.cat([tiled, coords], dim=1))


def _check_arguments(input_shape: tuple[int, int, int], base_channels: int,
                     decoder: str) -> None:
    _, height, width = input_shape
    if height % 16 or width % 16:
        raise ValueError(f"input height and width must be multiples of 16, got {input_shape}")
    if base_channels < 1:
        raise ValueError(f"base_channels must be at least 1, got {base_channels}")
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")


def _encoder(channels: int, widths: list[int]) -> nn.Sequential:
    """Stride-2 4x4 convolutions through ``widths``, flattened: (N, C, H, W) -> (N, flat)."""
    layers, in_ch = [], channels
    for out_ch in widths:
        layers += [nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        in_ch = out_ch
    return nn.Sequential(*layers, nn.Flatten())


def _decoder(widths: list[int], channels: int) -> nn.Sequential:
    """The encoder's mirror: stride-2 4x4 deconvolutions from ``widths[-1]`` to ``channels``
    logits, no activation after the last."""
    layers, in_ch = [], widths[-1]
    for out_ch in (*reversed(widths[:-1]), channels):
        layers += [nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        in_ch = out_ch
    return nn.Sequential(*layers[:-1])


class VAE(nn.Module):
    """Conv VAE for (3, 64, 64) frames in [0, 1]; four stride-2 stages down to 4x4 and back up,
    with base_channels, 2x, 4x and 8x as many channels (the decoder mirrors the encoder)."""

    def __init__(self, input_shape: tuple[int, int, int] = (3, 64, 64), latent_dim: int = 32,
                 decoder: str = "deconv", locator: bool = False, coords: bool = False,
                 mask: bool = False, base_channels: int = 16, fourier: bool = False):
        super().__init__()
        _check_arguments(input_shape, base_channels, decoder)
        channels, height, width = input_shape
        self.input_shape = tuple(input_shape)
        self.latent_dim = latent_dim
        self.decoder_kind = decoder
        self.base_channels = base_channels
        widths = [base_channels * 2 ** stage for stage in range(STAGES)]
        self._grid = (widths[-1], height // 16, width // 16)
        flat = widths[-1] * (height // 16) * (width // 16)
        self.encoder = _encoder(channels, widths)
        self.to_mu = nn.Linear(flat, latent_dim)
        self.to_logvar = nn.Linear(flat, latent_dim)
        self.from_z = nn.Linear(latent_dim, flat)
        self.decoder = _decoder(widths, channels)  # logits; sigmoid applied in decode()
        # "broadcast" adds a second path whose logits are summed with the first: the deconv
        # path keeps drawing bricks and digits, the broadcast path has an easy way to place
        # small moving objects.
        self.broadcast = (BroadcastDecoder(latent_dim, channels, height, width)
                          if decoder == "broadcast" else None)
        self._add_state_heads(latent_dim, height * width, locator, mask, coords, fourier)
        self.register_buffer("half_size_px", torch.tensor(input_shape[1:], dtype=torch.float32) / 2,
                             persistent=False)
        # A per-pixel output bias, independent of the input: set to the training background's
        # logits before training, so the decoder spends z on moving objects, not the backdrop.
        self.output_bias = nn.Parameter(torch.zeros(input_shape))

    def _add_state_heads(self, latent_dim: int, pixels: int, locator: bool, mask: bool,
                         coords: bool, fourier: bool) -> None:
        """The optional heads that read game state off the posterior mean, each a line."""
        # p(where | mu): a categorical over pixel positions of the frame's small moving objects
        # (ball, shots), linear in the posterior mean, so the mean must say where they are in
        # a form a line can read.
        self.locator = nn.Linear(latent_dim, pixels) if locator else None
        # p(foreground | mu) pixel by pixel, linear in the posterior mean: where every object
        # is (paddle, ball, removed bricks) must be readable by a line, as the state probe and
        # a linear planner read it.
        self.mask = nn.Linear(latent_dim, pixels) if mask else None
        # (row, col) of the single small object in view, a line from the posterior mean: the
        # position a planner reads, kept linear in z by construction.
        self.coords = nn.Linear(latent_dim, 2) if coords else None
        # log of the head's error scale in pixels, learned: its Gaussian likelihood pulls
        # gently while the guess is far off and harder as the guess gets good
        self.coords_log_px = nn.Parameter(torch.tensor(2.0)) if coords else None
        # cos and sin of the same object's row and column at FOURIER_PERIODS_PX, a line from the
        # posterior mean: a code whose every pixel a linear classifier can single out, which
        # a line to (row, col) is not; its log error scale is learned like the coordinates'.
        self.fourier = nn.Linear(latent_dim, 4 * len(FOURIER_PERIODS_PX)) if fourier else None
        # starts at e^-1 = 0.37: about the error of a guess that knows nothing (waves of unit
        # amplitude have an RMS of 0.71)
        self.fourier_log_scale = nn.Parameter(torch.tensor(-1.0)) if fourier else None
        self.register_buffer("fourier_periods_px", torch.tensor(FOURIER_PERIODS_PX),
                             persistent=False)

    def architecture(self) -> dict:
        """The keyword arguments that build a VAE of this shape: ``VAE(**vae.architecture())``."""
        return {"input_shape": list(self.input_shape), "latent_dim": self.latent_dim,
                "decoder": self.decoder_kind, "base_channels": self.base_channels,
                "locator": self.locator is not None, "coords": self.coords is not None,
                "fourier": self.fourier is not None, "mask": self.mask is not None}

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, 64, 64) in [0, 1] -> posterior mean and log-variance, each (N, latent_dim)."""
        h = self.encoder(x)
        return self.to_mu(h), self.to_logvar(h).clamp(-20.0, 10.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(N, latent_dim) -> (N, 3, 64, 64) reconstruction in [0, 1]."""
        h = self.from_z(z).view(-1, *self._grid)
        logits = self.decoder(nn.functional.leaky_relu(h, 0.2)) + self.output_bias
        if self.broadcast is not None:
            logits = logits + self.broadcast(z)
        return torch.sigmoid(logits)

    def locate(self, z: torch.Tensor) -> torch.Tensor:
        """(N, latent_dim) -> (N, H*W) logits of where the small moving objects are."""
        if self.locator is None:
            raise ValueError("this VAE was built without a locator (locator=True adds one)")
        return self.locator(z)

    def foreground_logits(self, z: torch.Tensor) -> torch.Tensor:
        """(N, latent_dim) -> (N, H*W) logits that each pixel differs from the background."""
        if self.mask is None:
            raise ValueError("this VAE was built without a mask head (mask=True adds one)")
        return self.mask(z)

    def point(self, z: torch.Tensor) -> torch.Tensor:
        """(N, latent_dim) -> (N, 2) float32 (row, col) in pixels of the small object in view."""
        if self.coords is None:
            raise ValueError("this VAE was built without a coordinate head (coords=True adds one)")
        # The line gives -1..1 across the frame: Adam moves a weight by ~lr a step, so a line
        # that had to reach 0..63 itself would grow z instead (KL 767 nats after one epoch).
        half = self.half_size_px
        return half - 0.5 + half * self.coords(z).float()  # float32: bf16 steps 0.25 px at 63

    def waves(self, z: torch.Tensor) -> torch.Tensor:
        """(N, latent_dim) -> (N, 4 * len(FOURIER_PERIODS_PX)) float32: the Fourier head's cos
        and sin of the small object's (row, col), as ``losses.fourier_code`` orders them."""
        if self.fourier is None:
            raise ValueError("this VAE was built without a Fourier head (fourier=True adds one)")
        return self.fourier(z).float()

    @torch.no_grad()
    def init_output_bias(self, background: torch.Tensor) -> None:
        """Start the output bias at logit(background): a (1, 3, H, W) image in [0, 1]."""
        self.output_bias.copy_(torch.logit(background.reshape(self.input_shape), eps=1e-3))

    @torch.no_grad()
    def init_mask_bias(self, rate: torch.Tensor) -> None:
        """Start the mask head at logit(rate): (1, 1, H, W), the share of training frames in
        which each pixel is foreground, so its first steps are not spent learning the bricks."""
        if self.mask is None:
            raise ValueError("this VAE was built without a mask head (mask=True adds one)")
        self.mask.bias.copy_(torch.logit(rate.flatten(), eps=1e-3))

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """Sample z ~ N(mu, exp(logvar)) differentiably; returns mu itself in eval mode."""
        if not self.training:
            return mu
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x -> (x_hat, mu, logvar)."""
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar)), mu, logvar

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode ``n`` draws from the prior N(0, I): (n, 3, 64, 64) in [0, 1]."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator).to(device)
        return self.decode(z)


def latent_dim_of(state_dict: dict[str, torch.Tensor]) -> int:
    """The latent size a VAE state_dict was trained with."""
    return int(state_dict["to_mu.weight"].shape[0])


def decoder_of(state_dict: dict[str, torch.Tensor]) -> str:
    """The ``decoder`` a VAE state_dict was trained with (one of DECODERS)."""
    return "broadcast" if any(k.startswith("broadcast.") for k in state_dict) else "deconv"


def random_init_like(model: VAE, seed: int) -> VAE:
    """A VAE of ``model``'s architecture with fresh, seeded initial weights, on its device: the
    random-init control of the state probe and of the planner."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = VAE(**model.architecture())
    return fresh.to(next(model.parameters()).device)


def vae_from_architecture(config: dict) -> VAE:
    """A fresh VAE from a saved ``architecture()`` dict; other keys are ignored, and keys a
    model saved before they existed take their LEGACY_ARCHITECTURE value."""
    keys = {"input_shape", "latent_dim", *LEGACY_ARCHITECTURE}
    return VAE(**{**LEGACY_ARCHITECTURE, **{k: v for k, v in config.items() if k in keys}})


def vae_for(state_dict: dict[str, torch.Tensor],
            input_shape: tuple[int, int, int] = (3, 64, 64)) -> VAE:
    """A freshly built VAE of the shape ``state_dict`` was trained with (weights not loaded)."""
    return VAE(input_shape, latent_dim_of(state_dict), decoder_of(state_dict),
               locator="locator.weight" in state_dict, coords="coords.weight" in state_dict,
               mask="mask.weight" in state_dict, fourier="fourier.weight" in state_dict,
               base_channels=int(state_dict["encoder.0.weight"].shape[0]))
