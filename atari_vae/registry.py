"""VAE model I/O: logging to MLflow without pickle, loading from a file or any model URI,
``load_registered``. Which version holds the ``champion`` alias is ``promotion.py``'s business.

A logged model is an MLflow pyfunc whose ``loader_module`` is the installed
``atari_vae.pyfunc_model`` (no code is stored with it) and whose data folder ``vae/`` holds
``config.json`` and ``model.safetensors``. Loading reads those two files only: no pickle, no
cloudpickle, no code from the artifact store.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from atari_vae.envs import FRAME_SHAPE
from atari_vae.errors import AtariVaeError
from atari_vae.files import atomic_path, atomic_write_text, load_error_reason
from atari_vae.model import VAE, vae_for, vae_from_architecture

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
DATA_DIR = "vae"
PREPROCESSING = ("atari_vae.preprocess: raw ALE RGB (210,160,3) uint8 -> area resize to 64x64 "
                 "(ale-py vector env's resize, bit-exact) -> float32 CHW in [0,1]")


def save_vae_dir(model: VAE, directory: Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for ``model`` into ``directory``."""
    from safetensors.torch import save

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(directory / "model.safetensors") as tmp:
        tmp.write_bytes(save(state))  # save_file would recreate the file 0600
    config = {"format_version": FORMAT_VERSION, **model.architecture(),
              "preprocessing": PREPROCESSING,
              **(metadata or {})}
    atomic_write_text(directory / "config.json", json.dumps(config, indent=2))
    return directory


def load_vae_dir(directory: str | Path, device: str | torch.device = "cpu") -> VAE:
    """A VAE in eval mode from a folder written by ``save_vae_dir``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        config = json.loads((directory / "config.json").read_text())
        state = load_file(str(directory / "model.safetensors"), device=str(device))
    except (OSError, ValueError) as exc:
        raise AtariVaeError(f"{directory} is not a saved atari-vae model: {exc}") from exc
    model = vae_from_architecture(config)
    model.load_state_dict(state)
    return model.to(device).eval()


def logged_model_name(game: str | None) -> str:
    """The logged model's name for ``game`` ("Breakout,Pong" -> "breakout-pong")."""
    return "-".join(g.strip().lower() for g in game.split(",")) if game else "model"


def log_vae_model(model: VAE, metadata: dict[str, Any] | None = None, name: str | None = None,
                  metrics: dict[str, float] | None = None, step: int | None = None) -> Any:
    """Log ``model`` to the active run as a pickle-free pyfunc named after its game, then log
    ``metrics`` (the run's final ones) linked to it."""
    import mlflow
    import numpy as np
    from mlflow.models import infer_signature

    from atari_vae import tracking

    name = name or logged_model_name((metadata or {}).get("game"))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # MLflow asks for an input example; the explicit signature already gives what it would
        warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\..*")
        vae_dir = save_vae_dir(model, Path(tmp) / DATA_DIR, metadata)
        example = np.zeros((2, *FRAME_SHAPE), dtype=np.float32)
        signature = infer_signature(example, np.zeros((2, model.latent_dim), dtype=np.float32))
        info = tracking.retrying(
            f"logging model {name!r}", lambda: mlflow.pyfunc.log_model(
                name=name, loader_module="atari_vae.pyfunc_model", data_path=str(vae_dir),
                signature=signature, pip_requirements=_requirements(),
                step=step or 0))  # the UI pairs a run's metrics with models of their step
    if metrics:
        tracking.log_metrics(metrics, step=step, model_id=info.model_id)
    return info


def _requirements() -> list[str]:
    import mlflow
    import numpy
    import safetensors

    from atari_vae import __version__

    # The serving host installs atari-vae itself: the loader module is never stored with a model.
    return [f"atari-vae=={__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"mlflow=={mlflow.__version__}", f"numpy=={numpy.__version__}",
            f"safetensors=={safetensors.__version__}"]


def load_model(uri: str, device: str | torch.device = "cpu") -> VAE:
    """A VAE from a state_dict or checkpoint file, or an MLflow ``models:/`` or ``runs:/`` URI."""
    if uri.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        return load_vae_dir(download_vae_dir(uri), device)
    return load_state_file(Path(uri), device)


def load_state_file(path: Path, device: str | torch.device = "cpu") -> VAE:
    """A VAE from ``best_model.pt``-style state_dicts or full training checkpoints."""
    if not path.is_file():
        raise AtariVaeError(f"model file {path} does not exist (give a .pt state_dict, a "
                            f"checkpoint, models:/<name>@<alias> or runs:/<run_id>/<game>)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state["model"] if isinstance(state, dict) and "model" in state else state
        model = vae_for(state, FRAME_SHAPE)
        model.load_state_dict(state)
    except Exception as exc:  # truncated, foreign, or not a VAE state_dict
        reason = load_error_reason(exc)[:200]
        raise AtariVaeError(f"{path} is not a readable atari-vae model ({reason})") from exc
    return model.to(device).eval()


def download_vae_dir(uri: str) -> Path:
    """The local ``vae/`` folder of a logged model: downloads it for a models:/ or runs:/ URI."""
    import mlflow

    from atari_vae import tracking

    tracking.configure()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # tiny downloads
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri.rstrip("/")))
    except Exception as exc:
        raise AtariVaeError(f"cannot load {uri}: {str(exc).splitlines()[0][:300]}") from exc
    # data/vae: models logged with the loader module; artifacts/vae: older "models from code"
    for vae_dir in (local / "data" / DATA_DIR, local / "artifacts" / DATA_DIR):
        if (vae_dir / "config.json").is_file():
            return vae_dir
    raise AtariVaeError(f"{uri} is not an atari-vae model (no vae/config.json in it)")


def load_registered(name: str, alias: str = "champion", version: int | str | None = None,
                    device: str | torch.device = "cpu") -> VAE:
    """The registered VAE ``name`` at ``alias`` (or ``version``), in eval mode, without pickle."""
    uri = f"models:/{name}/{version}" if version is not None else f"models:/{name}@{alias}"
    return load_model(uri, device)
