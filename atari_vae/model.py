"""The VAE: a convolutional encoder to (mu, logvar) and a decoder from z back to pixels.

Everything the decoder knows passes through z: there are no skip connections around the latent.
"""

from __future__ import annotations

import torch
from torch import nn

ENCODER_CHANNELS = (32, 64, 128, 256)


class VAE(nn.Module):
    """Conv VAE for (3, 64, 64) frames in [0, 1]; four stride-2 stages down to 4x4 and back up."""

    def __init__(self, input_shape: tuple[int, int, int] = (3, 64, 64), latent_dim: int = 32):
        super().__init__()
        channels, height, width = input_shape
        if height % 16 or width % 16:
            raise ValueError(f"input height and width must be multiples of 16, got {input_shape}")
        self.input_shape = tuple(input_shape)
        self.latent_dim = latent_dim
        self._grid = (ENCODER_CHANNELS[-1], height // 16, width // 16)
        flat = ENCODER_CHANNELS[-1] * (height // 16) * (width // 16)

        layers, in_ch = [], channels
        for out_ch in ENCODER_CHANNELS:
            layers += [nn.Conv2d(in_ch, out_ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            in_ch = out_ch
        self.encoder = nn.Sequential(*layers, nn.Flatten())
        self.to_mu = nn.Linear(flat, latent_dim)
        self.to_logvar = nn.Linear(flat, latent_dim)

        self.from_z = nn.Linear(latent_dim, flat)
        layers = []
        for out_ch in (*reversed(ENCODER_CHANNELS[:-1]), channels):
            layers += [nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1),
                       nn.LeakyReLU(0.2)]
            in_ch = out_ch
        self.decoder = nn.Sequential(*layers[:-1])  # logits; sigmoid applied in decode()
        # A per-pixel output bias, independent of the input: set to the training background's
        # logits before training, so the decoder spends z on moving objects, not the backdrop.
        self.output_bias = nn.Parameter(torch.zeros(input_shape))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, 64, 64) in [0, 1] -> posterior mean and log-variance, each (N, latent_dim)."""
        h = self.encoder(x)
        return self.to_mu(h), self.to_logvar(h).clamp(-20.0, 10.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(N, latent_dim) -> (N, 3, 64, 64) reconstruction in [0, 1]."""
        h = self.from_z(z).view(-1, *self._grid)
        return torch.sigmoid(self.decoder(nn.functional.leaky_relu(h, 0.2)) + self.output_bias)

    @torch.no_grad()
    def init_output_bias(self, background: torch.Tensor) -> None:
        """Start the output bias at logit(background): a (1, 3, H, W) image in [0, 1]."""
        self.output_bias.copy_(torch.logit(background.reshape(self.input_shape), eps=1e-3))

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
