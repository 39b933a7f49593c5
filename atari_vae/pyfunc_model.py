"""MLflow "model from code": serves a VAE's latent means without unpickling anything.

MLflow stores this file as source text and runs it at load time; the weights are a safetensors
file and a JSON config beside it. Not imported by the package itself.
"""

from __future__ import annotations

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel


class VAEEncoder(PythonModel):
    """predict: (N, 3, 64, 64) float32 frames in [0, 1] -> (N, latent_dim) posterior means."""

    def load_context(self, context) -> None:
        from atari_vae.registry import load_vae_dir

        self.vae = load_vae_dir(context.artifacts["vae"])

    # np.ndarray is a hint MLflow accepts without inferring a schema from it: the logged
    # signature stays the explicit one, and MLflow stops warning that predict has no hints.
    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        frames = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            mu, _ = self.vae.encode(frames)
        return mu.numpy()


mlflow.models.set_model(VAEEncoder())
