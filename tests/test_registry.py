"""Model I/O: pickle-free logging, loading by URI or registered name, clear errors.

Who holds the champion alias is tested in test_promotion.py."""

from __future__ import annotations

import warnings

import mlflow
import numpy as np
import pytest
import torch

from atari_vae import registry, tracking
from atari_vae.data import load_or_collect
from atari_vae.envs import FRAME_SHAPE, resolve_game
from atari_vae.errors import AtariVaeError
from atari_vae.metrics import reference_frames
from atari_vae.model import VAE

BREAKOUT = resolve_game("Breakout")


def untrained_vae(good: bool) -> VAE:
    """An untrained VAE whose output starts at the game's background (good) or its negative."""
    torch.manual_seed(0)
    model = VAE(FRAME_SHAPE, latent_dim=8)
    _, background = reference_frames(load_or_collect(BREAKOUT, 3, 60, 42, False).frames_uint8)
    model.init_output_bias(background if good else 1.0 - background)
    return model.eval()


def log_model(good: bool) -> tuple[str, str]:
    """(model_uri, run_id) of a run that logged a good or a bad model."""
    tracking.configure("atari-vae")
    with tracking.tracked_run("good" if good else "bad") as run:
        info = registry.log_vae_model(untrained_vae(good), {"game": "Breakout"})
    return info.model_uri, run.info.run_id


def register(good: bool, name: str) -> str:
    """Register a logged model as a new version of ``name`` and give it the alias by hand."""
    uri, run_id = log_model(good)
    version = mlflow.register_model(uri, name).version
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", version)
    return str(version)


def test_registered_model_serves_latent_means_through_pyfunc() -> None:
    register(good=True, name="served")
    frames = np.random.default_rng(0).random((3, *FRAME_SHAPE), dtype=np.float32)
    served = mlflow.pyfunc.load_model("models:/served@champion").predict(frames)
    vae = registry.load_registered("served")
    assert not vae.training
    with torch.no_grad():
        mu, _ = vae.encode(torch.from_numpy(frames))
    assert served.shape == (3, 8)
    np.testing.assert_allclose(served, mu.numpy(), rtol=1e-5, atol=1e-6)


def test_a_broadcast_decoder_every_head_and_the_width_round_trip_the_registry() -> None:
    torch.manual_seed(0)
    model = VAE(FRAME_SHAPE, latent_dim=8, decoder="broadcast", locator=True,
                coords=True, mask=True, base_channels=8, fourier=True).eval()
    tracking.configure("atari-vae")
    with tracking.tracked_run("broadcast"):
        info = registry.log_vae_model(model, {"game": "Breakout"})
    mlflow.register_model(info.model_uri, "bcast")
    loaded = registry.load_registered("bcast", version=1)
    assert loaded.decoder_kind == "broadcast" and loaded.locator is not None
    assert loaded.coords is not None and loaded.mask is not None
    assert loaded.fourier is not None and loaded.base_channels == 8
    z = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(z), model.decode(z))
        torch.testing.assert_close(loaded.waves(z), model.waves(z))
        torch.testing.assert_close(loaded.locate(z), model.locate(z))
        torch.testing.assert_close(loaded.point(z), model.point(z))
        torch.testing.assert_close(loaded.foreground_logits(z), model.foreground_logits(z))


def test_missing_registered_name_or_alias_is_a_clear_error() -> None:
    register(good=True, name="present")
    with pytest.raises(AtariVaeError, match="cannot load models:/absent@champion"):
        registry.load_registered("absent")
    with pytest.raises(AtariVaeError, match="models:/present@nope"):
        registry.load_registered("present", alias="nope")


def test_logging_a_model_raises_no_mlflow_warning_about_predict_type_hints() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log_model(good=True)
    assert not [w for w in caught if "type hint" in str(w.message).lower()]
