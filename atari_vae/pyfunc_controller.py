"""The MLflow pyfunc flavor of a controller: latent features in, actions out, from the package.

A logged controller's MLmodel names this module as its ``loader_module``; its data folder
``controller/`` holds ``config.json`` + ``controller.safetensors`` (no pickle, no stored code).
The full policy, raw frames to actions with the VAE it was trained on: ``atari_vae.load_policy``.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ControllerModel:
    """predict: (N, F) float32 features (mu, or mu and its step difference) -> (N,) actions."""

    def __init__(self, controller: Any) -> None:
        self.controller = controller

    def predict(self, model_input: Any, params: dict | None = None) -> np.ndarray:
        return self.controller.act(np.asarray(model_input, dtype=np.float32))


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> ControllerModel:
    """MLflow's loader hook: ``data_path`` is the logged ``controller/`` folder."""
    from atari_vae.controller import load_controller_dir

    return ControllerModel(load_controller_dir(data_path))
