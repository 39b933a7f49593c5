"""atari-vae: variational autoencoders for 64x64 Atari frames, tracked in MLflow.

Planner API: ``preprocess`` raw observations, ``VAE`` to encode them, ``load_registered``
to fetch the champion model by name.
"""

from atari_vae.envs import preprocess
from atari_vae.model import VAE

__version__ = "0.1.0"
__all__ = ["VAE", "load_registered", "preprocess", "__version__"]


def load_registered(name: str, alias: str = "champion", version: int | str | None = None,
                    device: str = "cpu") -> VAE:
    """The registered VAE ``name`` at ``alias`` (or ``version``), in eval mode, without pickle."""
    from atari_vae.registry import load_registered as _load

    return _load(name, alias=alias, version=version, device=device)
