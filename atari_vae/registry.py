"""VAE models in MLflow: logging without pickle, loading from any model URI, ``load_registered``,
registering versions and moving the ``champion`` alias only to a better-scoring version.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from atari_vae.envs import FRAME_SHAPE
from atari_vae.errors import AtariVaeError
from atari_vae.files import atomic_path, atomic_write_text, load_error_reason
from atari_vae.model import VAE, latent_dim_of

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
    config = {"format_version": FORMAT_VERSION, "input_shape": list(model.input_shape),
              "latent_dim": model.latent_dim, "preprocessing": PREPROCESSING,
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
    model = VAE(tuple(config["input_shape"]), config["latent_dim"])
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
        return load_vae_dir(_download_vae_dir(uri), device)
    return load_state_file(Path(uri), device)


def load_state_file(path: Path, device: str | torch.device = "cpu") -> VAE:
    """A VAE from ``best_model.pt``-style state_dicts or full training checkpoints."""
    if not path.is_file():
        raise AtariVaeError(f"model file {path} does not exist (give a .pt state_dict, a "
                            f"checkpoint, models:/<name>@<alias> or runs:/<run_id>/model)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state["model"] if isinstance(state, dict) and "model" in state else state
        model = VAE(FRAME_SHAPE, latent_dim_of(state))
        model.load_state_dict(state)
    except Exception as exc:  # truncated, foreign, or not a VAE state_dict
        reason = load_error_reason(exc)[:200]
        raise AtariVaeError(f"{path} is not a readable atari-vae model ({reason})") from exc
    return model.to(device).eval()


def _download_vae_dir(uri: str) -> Path:
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


# --- registration and the champion alias -------------------------------------------------------

CHAMPION = "champion"
SCORE_TAG = "heldout_score"
EVAL_TAG = "heldout_eval"
LOCK_TIMEOUT_S = 900
MODEL_DESCRIPTION = (
    "atari-vae encoders: 64x64 RGB Atari frames (atari_vae.preprocess) -> latent means. Alias "
    "'champion' marks the version that scores best on the held-out comparison (see each "
    "version's heldout_score and champion_decision tags). Planner: "
    "atari_vae.load_registered('{name}'); serving: mlflow models serve -m "
    "models:/{name}@champion.")


@dataclass
class ChampionDecision:
    """What happened to the ``champion`` alias when ``version`` was registered."""

    name: str
    version: str
    score: float
    moved: bool
    reason: str
    champion: str | None  # the version holding the alias afterwards


def register_version(model_uri: str, name: str, run_id: str, tags: dict[str, str],
                     description: str) -> str:
    """Register ``model_uri`` (logged by run ``run_id``) under ``name``; reuse its version if any.

    Several workers of one study may all try to register the same best trial.
    """
    import mlflow

    client = mlflow.MlflowClient()
    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if existing:
        return str(max(int(v.version) for v in existing))
    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    client.update_model_version(name, version.version, description=description)
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=MODEL_DESCRIPTION.format(name=name))
    return str(version.version)


def champion_version(name: str) -> str | None:
    """The version that holds the ``champion`` alias of ``name``, if any."""
    import mlflow

    try:
        aliases = mlflow.MlflowClient().get_registered_model(name).aliases
    except mlflow.exceptions.MlflowException:  # no such registered model yet
        return None
    return str(aliases[CHAMPION]) if CHAMPION in aliases else None


def promote_if_better(name: str, version: str, score: Callable[[VAE], float], eval_key: str,
                      device: str | torch.device = "cpu") -> ChampionDecision:
    """Move ``champion`` to ``version`` only if it scores higher than the current champion.

    Both are scored now by ``score`` on the same held-out frames (``eval_key`` names them) and
    the scores are kept as version tags. The compare-and-set runs under a file lock for local
    stores; for remote ones ``settle_champion`` afterwards repairs a lost race.
    """
    import mlflow

    from atari_vae import tracking

    client = mlflow.MlflowClient()
    with tracking.local_store_lock("registry", LOCK_TIMEOUT_S):
        new_score = _score_version(client, name, version, score, eval_key, device)
        current = champion_version(name)
        if current is None:
            moved, reason = True, "no champion yet"
        elif current == version:
            moved, reason = False, f"version {version} already is the champion"
        else:
            old = _score_version(client, name, current, score, eval_key, device)
            moved = new_score > old
            verdict = "beats" if moved else "does not beat"
            reason = (f"held-out score {new_score:.3f} {verdict} champion version {current}'s "
                      f"{old:.3f} on {eval_key}")
        if moved:
            client.set_registered_model_alias(name, CHAMPION, version)
        holder = settle_champion(name, eval_key)
    client.set_model_version_tag(name, version, "champion_decision", reason)
    return ChampionDecision(name, version, new_score, holder == version, reason, holder)


def settle_champion(name: str, eval_key: str, rounds: int = 10) -> str | None:
    """Point ``champion`` at the best-scored version under ``eval_key``; repeat until stable.

    Scores only ever get added, so after every writer's last re-check the alias rests on the
    best version, whatever the interleaving of concurrent writers.
    """
    import mlflow

    client = mlflow.MlflowClient()
    holder = champion_version(name)
    for _ in range(rounds):
        scored = {str(v.version): float(v.tags[SCORE_TAG])
                  for v in client.search_model_versions(f"name='{name}'")
                  if v.tags.get(EVAL_TAG) == eval_key and SCORE_TAG in v.tags}
        if not scored:
            return holder
        # ties keep the current holder
        best = max(scored, key=lambda v: (scored[v], v == holder))
        if best == holder:
            return holder
        log.info("champion of %s: version %s scores %.3f, above version %s; moving the alias",
                 name, best, scored[best], holder)
        client.set_registered_model_alias(name, CHAMPION, best)
        holder = champion_version(name)
    return holder


def _score_version(client: Any, name: str, version: str, score: Callable[[VAE], float],
                   eval_key: str, device: str | torch.device) -> float:
    """Score a registered version and record the score as tags on it."""
    try:
        value = float(score(load_registered(name, version=version, device=device)))
    except AtariVaeError as exc:  # an unreadable old champion must not block a new one
        log.warning("cannot score %s version %s (%s); treating it as worst", name, version, exc)
        value = float("-inf")
    client.set_model_version_tag(name, version, SCORE_TAG, repr(value))
    client.set_model_version_tag(name, version, EVAL_TAG, eval_key)
    return value
