"""The linear controller: params round-trip, pickle-free files, features, the raw-frame policy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from atari_vae import preprocess
from atari_vae.controller import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LinearController,
    Policy,
    load_controller_dir,
    make_features,
    n_params,
    save_controller_dir,
    standardisation,
)
from atari_vae.errors import AtariVaeError
from atari_vae.model import VAE


def _controller(features: str = "mu", latent_dim: int = 8, n_actions: int = 4,
                seed: int = 0) -> LinearController:
    rng = np.random.default_rng(seed)
    dim = latent_dim * (2 if features == "mu_delta" else 1)
    return LinearController.from_params(
        rng.normal(size=n_params(latent_dim, n_actions, features)), latent_dim, n_actions,
        features, {"game": "Breakout", "vae_model_name": "m", "vae_version": "3"},
        rng.normal(size=dim).astype(np.float32), rng.uniform(0.5, 2, dim).astype(np.float32))


@pytest.mark.parametrize("features", ["mu", "mu_delta"])
def test_params_round_trip_through_the_flat_vector(features):
    x = np.random.default_rng(1).normal(size=n_params(8, 4, features)).astype(np.float32)
    ctrl = LinearController.from_params(x, 8, 4, features)
    assert ctrl.weight.shape == (4, 8 * (2 if features == "mu_delta" else 1))
    np.testing.assert_array_equal(ctrl.params(), x)
    with pytest.raises(ValueError, match="params"):
        LinearController.from_params(x[:-1], 8, 4, features)


def test_act_is_the_argmax_of_the_standardised_linear_logits():
    ctrl = _controller()
    feats = np.random.default_rng(2).normal(size=(16, 8)).astype(np.float32)
    logits = ((feats - ctrl.shift) * ctrl.scale) @ ctrl.weight.T + ctrl.bias
    np.testing.assert_array_equal(ctrl.act(feats), logits.argmax(axis=1))
    assert ctrl.act(feats).dtype == np.int64


@pytest.mark.parametrize("features", ["mu", "mu_delta"])
def test_save_and_load_without_pickle_give_the_same_controller(tmp_path, features):
    ctrl = _controller(features)
    folder = save_controller_dir(ctrl, tmp_path / "controller")
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert (config["features"], config["vae_model_name"], config["vae_version"]) == (
        features, "m", "3")
    from safetensors.numpy import load_file  # plain tensors, nothing to unpickle

    assert set(load_file(str(folder / WEIGHTS_FILE))) == {"weight", "bias", "shift", "scale"}
    loaded = load_controller_dir(folder)
    for key in ("weight", "bias", "shift", "scale"):
        np.testing.assert_array_equal(getattr(loaded, key), getattr(ctrl, key))
    assert loaded.metadata == ctrl.metadata and loaded.features == features


def test_loading_a_folder_that_is_not_a_controller_says_so(tmp_path):
    with pytest.raises(AtariVaeError, match="not a saved atari-vae controller"):
        load_controller_dir(tmp_path)


def test_mu_delta_features_are_mu_and_its_step_difference_zero_at_the_start():
    mu, prev = np.ones((2, 3), np.float32), np.full((2, 3), 0.25, np.float32)
    np.testing.assert_array_equal(make_features(mu, prev, "mu"), mu)
    np.testing.assert_array_equal(make_features(mu, prev, "mu_delta")[:, 3:], mu - prev)
    np.testing.assert_array_equal(make_features(mu, None, "mu_delta")[:, 3:], 0)


def test_standardisation_maps_columns_to_zero_mean_unit_std_and_switches_off_constants():
    feats = np.random.default_rng(3).normal(3.0, 5.0, size=(500, 4))
    feats[:, 2] = 7.0
    shift, scale = standardisation(feats)
    out = (feats - shift) * scale
    np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(out.std(axis=0)[[0, 1, 3]], 1, atol=1e-4)
    assert scale[2] == 0


@pytest.mark.parametrize("features", ["mu", "mu_delta"])
def test_policy_maps_raw_frames_to_the_controllers_actions_on_the_vaes_means(features):
    torch.manual_seed(0)
    vae = VAE((3, 64, 64), 8).eval()
    ctrl = _controller(features)
    policy = Policy(vae, ctrl)
    rng = np.random.default_rng(4)
    first, second = (rng.integers(0, 256, (5, 210, 160, 3), dtype=np.uint8) for _ in range(2))
    with torch.no_grad():
        mu1, mu2 = (vae.encode(preprocess(f))[0].numpy() for f in (first, second))
    actions = policy(first), policy(second)
    assert actions[0].shape == (5,) and actions[0].dtype == np.int64
    np.testing.assert_array_equal(actions[0], ctrl.act(make_features(mu1, None, features)))
    np.testing.assert_array_equal(actions[1], ctrl.act(make_features(mu2, mu1, features)))
    policy.reset()
    np.testing.assert_array_equal(policy(second), ctrl.act(make_features(mu2, None, features)))


def test_policy_refuses_a_vae_of_another_latent_size():
    with pytest.raises(AtariVaeError, match="latent_dim"):
        Policy(VAE((3, 64, 64), 16), _controller())
