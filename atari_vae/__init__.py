"""atari-vae: variational autoencoders for 64x64 Atari frames, tracked in MLflow.

Planner API: ``preprocess`` raw observations, ``VAE`` to encode them, ``load_registered``
to fetch the champion model by name, ``load_policy`` for a registered controller with its VAE.
"""

from atari_vae.envs import preprocess
from atari_vae.model import VAE

__version__ = "0.1.0"
__all__ = ["VAE", "load_policy", "load_registered", "preprocess", "__version__"]


def load_registered(name: str, alias: str = "champion", version: int | str | None = None,
                    device: str = "cpu") -> VAE:
    """The registered VAE ``name`` at ``alias`` (or ``version``), in eval mode, without pickle."""
    from atari_vae.registry import load_registered as _load

    return _load(name, alias=alias, version=version, device=device)


def load_policy(name: str, alias: str = "champion", version: int | str | None = None,
                device: str = "cpu"):
    """The registered controller ``name`` (e.g. atari-vae-breakout-controller) at ``alias`` (or
    ``version``) with the VAE version it was trained on, without pickle: a callable mapping raw
    observations (N, 210, 160, 3) uint8 to actions (N,) int64 (the game's minimal action set)."""
    from atari_vae.policy_registry import load_policy as _load

    return _load(name, alias=alias, version=version, device=device)
