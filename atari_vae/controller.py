"""A linear controller from the VAE's latent means to action logits, its files, and the policy.

Features: ``mu`` (the posterior mean, latent_dim values) or ``mu_delta`` (mu and mu minus the
previous step's mu), standardised with a shift and scale measured on random-policy frames (so
CMA-ES's isotropic start fits every encoder alike, a random one too). Action =
argmax(W @ standardised features + b) over the game's minimal action set,
so the indices are what ``make_env``/``make_vector_env`` take. Saved as ``config.json`` +
``controller.safetensors`` (no pickle), beside the name and version of the VAE it was trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atari_vae.envs import preprocess, to_float
from atari_vae.errors import AtariVaeError
from atari_vae.files import atomic_path, atomic_write_text

FORMAT_VERSION = 1
WEIGHTS_FILE = "controller.safetensors"
CONFIG_FILE = "config.json"


def feature_dim(latent_dim: int, features: str) -> int:
    """Length of the controller's input vector."""
    return latent_dim * (2 if features == "mu_delta" else 1)


def n_params(latent_dim: int, n_actions: int, features: str) -> int:
    """Weights plus biases: what CMA-ES searches over."""
    return n_actions * (feature_dim(latent_dim, features) + 1)


def make_features(mu: np.ndarray, prev_mu: np.ndarray | None, features: str) -> np.ndarray:
    """(N, latent) means (and the previous step's, None at an episode's start) -> (N, F)."""
    if features == "mu":
        return mu
    delta = np.zeros_like(mu) if prev_mu is None else mu - prev_mu
    return np.concatenate([mu, delta], axis=1)


@dataclass
class LinearController:
    """logits = ((features - shift) * scale) @ weight.T + bias; weight (n_actions, F), bias
    (n_actions,), shift and scale (F,)."""

    weight: np.ndarray
    bias: np.ndarray
    latent_dim: int
    features: str = "mu"
    metadata: dict[str, Any] = field(default_factory=dict)  # game, actions, vae name/version
    shift: np.ndarray | None = None  # None: zeros
    scale: np.ndarray | None = None  # None: ones

    def __post_init__(self) -> None:
        dim = feature_dim(self.latent_dim, self.features)
        self.shift = np.zeros(dim, np.float32) if self.shift is None else self.shift
        self.scale = np.ones(dim, np.float32) if self.scale is None else self.scale

    @property
    def n_actions(self) -> int:
        return int(self.weight.shape[0])

    @classmethod
    def from_params(cls, params: np.ndarray, latent_dim: int, n_actions: int,
                    features: str = "mu", metadata: dict[str, Any] | None = None,
                    shift: np.ndarray | None = None, scale: np.ndarray | None = None
                    ) -> LinearController:
        """Unflatten a CMA-ES vector: the weights row by row, then the biases."""
        params = np.asarray(params, dtype=np.float32)
        dim = feature_dim(latent_dim, features)
        if params.shape != (n_params(latent_dim, n_actions, features),):
            raise ValueError(f"expected {n_params(latent_dim, n_actions, features)} params, "
                             f"got shape {params.shape}")
        weight = params[: n_actions * dim].reshape(n_actions, dim).copy()
        return cls(weight, params[n_actions * dim:].copy(), latent_dim, features,
                   dict(metadata or {}), shift, scale)

    def params(self) -> np.ndarray:
        """The flat vector ``from_params`` reads."""
        return np.concatenate([self.weight.ravel(), self.bias]).astype(np.float32)

    def standardise(self, feats: np.ndarray) -> np.ndarray:
        return (feats - self.shift) * self.scale

    def logits(self, feats: np.ndarray) -> np.ndarray:
        return self.standardise(feats) @ self.weight.T + self.bias

    def act(self, feats: np.ndarray) -> np.ndarray:
        """(N, F) features -> (N,) int64 action indices."""
        return self.logits(np.asarray(feats, dtype=np.float32)).argmax(axis=1).astype(np.int64)


def save_controller_dir(ctrl: LinearController, directory: Path) -> Path:
    """Write ``config.json`` and ``controller.safetensors`` into ``directory``."""
    from safetensors.numpy import save

    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        tmp.write_bytes(save({k: np.ascontiguousarray(getattr(ctrl, k), dtype=np.float32)
                              for k in ("weight", "bias", "shift", "scale")}))
    config = {"format_version": FORMAT_VERSION, "kind": "linear", "latent_dim": ctrl.latent_dim,
              "n_actions": ctrl.n_actions, "features": ctrl.features, **ctrl.metadata}
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2))
    return directory


def load_controller_dir(directory: str | Path) -> LinearController:
    """A controller from a folder written by ``save_controller_dir`` (no pickle)."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        arrays = load_file(str(directory / WEIGHTS_FILE))
        known = {"format_version", "kind", "latent_dim", "n_actions", "features"}
        ctrl = LinearController(arrays["weight"], arrays["bias"], int(config["latent_dim"]),
                                config["features"],
                                {k: v for k, v in config.items() if k not in known},
                                arrays["shift"], arrays["scale"])
    except (OSError, ValueError, KeyError) as exc:
        raise AtariVaeError(f"{directory} is not a saved atari-vae controller: {exc}") from exc
    if ctrl.weight.shape != (config["n_actions"], feature_dim(ctrl.latent_dim, ctrl.features)):
        raise AtariVaeError(f"{directory}: weight shape {ctrl.weight.shape} does not match "
                            f"its config.json")
    return ctrl


def standardisation(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shift, scale) that map ``feats`` (M, F) to zero mean and unit variance per column."""
    feats = np.asarray(feats, dtype=np.float64)
    std = feats.std(axis=0)
    scale = np.where(std > 1e-8, 1.0 / np.maximum(std, 1e-8), 0.0)  # constant columns: off
    return feats.mean(axis=0).astype(np.float32), scale.astype(np.float32)


def encode_frames(vae: torch.nn.Module, frames: np.ndarray | torch.Tensor) -> np.ndarray:
    """(N, 3, 64, 64) uint8 or float frames -> (N, latent) posterior means, as float32 numpy."""
    x = torch.as_tensor(frames)
    x = to_float(x) if x.dtype == torch.uint8 else x.float()
    device = next(vae.parameters()).device
    with torch.no_grad():
        mu, _ = vae.encode(x.to(device))
    return mu.cpu().numpy()


class Policy:
    """Raw observations (N, 210, 160, 3) uint8 -> actions (N,) int64: preprocess, encode (the
    VAE's posterior mean), the controller's argmax.

    With ``mu_delta`` features it remembers the previous batch's means (the batch is N
    parallel episodes, row i always the same one); call ``reset()`` when episodes restart.
    """

    def __init__(self, vae: torch.nn.Module, controller: LinearController) -> None:
        if vae.latent_dim != controller.latent_dim:
            raise AtariVaeError(f"the controller expects latent_dim {controller.latent_dim}, "
                                f"the VAE has {vae.latent_dim}")
        self.vae, self.controller = vae, controller
        self.action_names = controller.metadata.get("action_names")
        # "auto": planned with the env serving (FIRE after a lost life): play it in AutoServe
        self.serve = controller.metadata.get("serve", "controller")
        self._prev: np.ndarray | None = None

    def reset(self) -> None:
        """Forget the previous step (the next call starts new episodes)."""
        self._prev = None

    def __call__(self, observations: np.ndarray) -> np.ndarray:
        device = next(self.vae.parameters()).device
        with torch.no_grad():
            mu, _ = self.vae.encode(preprocess(observations).to(device))
        mu = mu.cpu().numpy()
        prev = self._prev if self._prev is not None and self._prev.shape == mu.shape else None
        actions = self.controller.act(make_features(mu, prev, self.controller.features))
        self._prev = mu
        return actions
