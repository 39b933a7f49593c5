"""Controllers in MLflow: the VAE version to plan from, logging a controller without pickle,
registering it beside that VAE version, its champion rule, and ``load_policy``.

A controller is logged like a VAE (``registry.py``): a pyfunc whose ``loader_module`` is the
installed ``atari_vae.pyfunc_controller`` and whose data folder ``controller/`` holds
``config.json`` (with the VAE's registered name and version) and ``controller.safetensors``.
So it has a model page, a signature and a URI to register, and loading runs no stored code.

Champion rule: a new controller version takes ``champion`` when there is none, or when its mean
test score beats the champion's on the same test protocol (game, test seeds, episode cap,
emulator settings). A champion scored on another protocol is first played on this one (the
``rescore`` callback; the score is kept in a tag ``test_score_mean:<protocol digest>`` beside its
own); without a callback it stays.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from atari_vae import registry, tracking
from atari_vae.controller import (
    CONFIG_FILE,
    LinearController,
    Policy,
    feature_dim,
    load_controller_dir,
    save_controller_dir,
)
from atari_vae.errors import AtariVaeError

log = logging.getLogger(__name__)
CHAMPION = "champion"
DATA_DIR = "controller"
SUFFIX = "-controller"
VAE_NAME_TAG, VAE_VERSION_TAG = "vae_model_name", "vae_version"
SCORE_TAG, PROTOCOL_TAG, DECISION_TAG = "test_score_mean", "test_protocol", "champion_decision"
DESCRIPTION = ("Linear controllers on the latent means of {vae} (CMA-ES on game score, "
               "atari-vae plan). Each version's tags name the VAE version it was trained on; "
               "atari_vae.load_policy('{name}') loads the pair: raw frames -> actions.")


def controller_name(vae_name: str) -> str:
    """The registered name of the controllers trained on ``vae_name``."""
    return f"{vae_name}{SUFFIX}"


VAE_HINT = ("register a VAE first: `atari-vae register --model_path outputs/<run>/best_model.pt "
            "--env_name <Game>` or `atari-vae tune --env_name <Game>`")
CONTROLLER_HINT = "train one with `atari-vae plan --env_name <Game>`"


def vae_version_at(name: str, alias: str, hint: str = VAE_HINT) -> str:
    """The version of registered model ``name`` (a VAE unless ``hint`` says otherwise) holding
    ``alias``, or one line saying how to make one."""
    import mlflow

    client = mlflow.MlflowClient()
    hint = f"{hint} (tracking store {tracking.tracking_uri()})"
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise AtariVaeError(f"no registered model {name!r}; {hint}") from None
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException as exc:
        if getattr(exc, "error_code", "") not in ("RESOURCE_DOES_NOT_EXIST",
                                                  "INVALID_PARAMETER_VALUE"):
            raise
        raise AtariVaeError(f"registered model {name!r} has no version with the alias "
                            f"{alias!r}; {hint}") from None


def log_controller_model(ctrl: LinearController) -> Any:
    """Log ``ctrl`` to the active run as the pickle-free pyfunc ``controller``."""
    import mlflow
    import numpy as np
    from mlflow.models import infer_signature

    dim = feature_dim(ctrl.latent_dim, ctrl.features)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\..*")
        data = save_controller_dir(ctrl, Path(tmp) / DATA_DIR)
        signature = infer_signature(np.zeros((2, dim), np.float32), np.zeros(2, np.int64))
        return tracking.retrying("logging the controller", lambda: mlflow.pyfunc.log_model(
            name=DATA_DIR, loader_module="atari_vae.pyfunc_controller", data_path=str(data),
            signature=signature, pip_requirements=registry._requirements()))


def register_controller(model_uri: str, name: str, tags: dict[str, Any], score: float,
                        protocol: str, rescore: Callable[[str], float | None] | None = None
                        ) -> tuple[str, str, bool]:
    """Register a logged controller as ``name``; (version, champion decision, is champion).
    ``rescore(version)``: a registered version's mean test score on ``protocol``, None if it
    cannot play it."""
    import mlflow

    client = mlflow.MlflowClient()
    version = str(mlflow.register_model(model_uri, name, tags={
        **{k: str(v) for k, v in tags.items()}, SCORE_TAG: repr(score),
        PROTOCOL_TAG: protocol}).version)
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=DESCRIPTION.format(
            vae=tags.get(VAE_NAME_TAG), name=name))
    with tracking.local_store_lock("registry"):
        reason, moved = _decide(client, name, version, score, protocol, rescore)
        if moved:
            client.set_registered_model_alias(name, CHAMPION, version)
    tracking.set_version_tags(client, name, version, {DECISION_TAG: reason})
    (log.info if moved else log.warning)("%s version %s %s champion: %s", name, version,
                                         "is" if moved else "is registered but not", reason)
    return version, reason, moved


def _decide(client: Any, name: str, version: str, score: float, protocol: str,
            rescore: Callable[[str], float | None] | None) -> tuple[str, bool]:
    """(why, whether ``version`` takes the alias) under the module's champion rule."""
    aliases = client.get_registered_model(name).aliases
    holder = str(aliases[CHAMPION]) if CHAMPION in aliases else None
    if holder is None:
        return f"no champion yet; test score {score:.2f}", True
    old = _score_on(client.get_model_version(name, holder).tags, protocol)
    if old is None and rescore is not None:
        log.info("playing champion version %s of %s on this run's test episodes", holder, name)
        old = rescore(holder)
        if old is not None:
            tracking.set_version_tags(client, name, holder,
                                      {protocol_score_tag(protocol): repr(old)})
    if old is None:
        return (f"champion version {holder} was tested on other episodes or plays under "
                f"another serve rule; not compared, the champion stays"), False
    if score > old or old != old:  # NaN: a champion without a readable score
        return f"test score {score:.2f} beats champion version {holder}'s {old:.2f}", True
    return f"test score {score:.2f} does not beat champion version {holder}'s {old:.2f}", False


def protocol_score_tag(protocol: str) -> str:
    """The tag holding a version's score on another run's test protocol (a short digest)."""
    import hashlib

    return f"{SCORE_TAG}:{hashlib.sha256(protocol.encode()).hexdigest()[:12]}"


def _score_on(tags: dict[str, str], protocol: str) -> float | None:
    """A version's recorded mean test score on ``protocol``, if it has one."""
    value = tags.get(SCORE_TAG) if tags.get(PROTOCOL_TAG) == protocol else tags.get(
        protocol_score_tag(protocol))
    return None if value is None else float(value)


def download_controller_dir(uri: str) -> Path:
    """The local ``controller/`` folder of a logged or registered controller."""
    import mlflow

    tracking.configure()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri.rstrip("/")))
    except Exception as exc:
        raise AtariVaeError(f"cannot load {uri}: {str(exc).splitlines()[0][:300]} (controllers "
                            f"are made by `atari-vae plan`)") from exc
    found = local / "data" / DATA_DIR
    if not (found / CONFIG_FILE).is_file():
        raise AtariVaeError(f"{uri} is not an atari-vae controller (no controller/config.json)")
    return found


def load_policy(name: str, alias: str = CHAMPION, version: int | str | None = None,
                device: str = "cpu") -> Policy:
    """The registered controller ``name`` at ``alias`` (or ``version``) with the VAE version it
    was trained on: a callable from raw frames (N, 210, 160, 3) uint8 to actions (N,)."""
    uri = f"models:/{name}/{version}" if version is not None else f"models:/{name}@{alias}"
    ctrl = load_controller_dir(download_controller_dir(uri))
    vae_name, vae_version = ctrl.metadata.get(VAE_NAME_TAG), ctrl.metadata.get(VAE_VERSION_TAG)
    if not vae_name or vae_version is None:
        raise AtariVaeError(f"{uri} does not name the VAE it was trained on")
    vae = registry.load_registered(vae_name, version=vae_version, device=device)
    return Policy(vae, ctrl)
