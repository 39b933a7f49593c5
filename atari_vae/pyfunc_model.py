"""The MLflow pyfunc flavor of a VAE: frames in, latent means out, from the installed package.

A logged model's MLmodel names this module as its ``loader_module``; MLflow imports it from the
environment (``pip install atari-vae``), so no code from the artifact store runs at load time
and the weights are read from ``config.json`` + ``model.safetensors`` only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class VAEEncoder:
    """predict: (N, 3, 64, 64) float32 frames in [0, 1] -> (N, latent_dim) posterior means."""

    def __init__(self, vae: torch.nn.Module) -> None:
        self.vae = vae

    def predict(self, model_input: Any, params: dict | None = None) -> np.ndarray:
        frames = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            mu, _ = self.vae.encode(frames)
        return mu.numpy()


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> VAEEncoder:
    """MLflow's loader hook: ``data_path`` is the logged ``vae/`` folder."""
    from atari_vae.registry import load_vae_dir

    return VAEEncoder(load_vae_dir(data_path))
