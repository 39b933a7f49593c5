"""The VAE's interface, the documented load line on a trained output, and pickle-free loading."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from atari_vae import VAE, registry
from atari_vae.config import TrainConfig
from atari_vae.data import load_or_collect, split_by_episode
from atari_vae.envs import resolve_game
from atari_vae.errors import AtariVaeError
from atari_vae.model import (
    decoder_of,
    latent_dim_of,
    random_init_like,
    vae_for,
    vae_from_architecture,
)
from atari_vae.train import fit
from tests.conftest import REPO, tiny_train_flags


@pytest.fixture
def frames() -> torch.Tensor:
    return torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_encode_decode_and_forward_shapes(frames):
    vae = VAE(input_shape=(3, 64, 64), latent_dim=32)
    mu, logvar = vae.encode(frames)
    assert mu.shape == logvar.shape == (4, 32)
    assert vae.decode(mu).shape == (4, 3, 64, 64)
    x_hat, mu2, logvar2 = vae(frames)
    assert x_hat.shape == (4, 3, 64, 64) and mu2.shape == logvar2.shape == (4, 32)


def test_decode_stays_in_unit_range_even_for_extreme_latents():
    vae = VAE(latent_dim=8)
    z = torch.cat([torch.full((1, 8), -1e3), torch.zeros(1, 8), torch.full((1, 8), 1e3)])
    x_hat = vae.decode(z)
    assert x_hat.min() >= 0.0 and x_hat.max() <= 1.0 and torch.isfinite(x_hat).all()


def test_eval_forward_is_decode_of_the_posterior_mean_so_z_is_the_only_path(frames):
    vae = VAE(latent_dim=16).eval()
    x_hat, mu, _ = vae(frames)
    assert torch.equal(x_hat, vae.decode(mu))  # nothing reaches the decoder except z
    assert torch.equal(vae(frames)[0], x_hat)  # deterministic in eval mode


def test_training_mode_samples_z(frames):
    vae = VAE(latent_dim=16).train()
    torch.manual_seed(0)
    first = vae(frames)[0]
    assert not torch.equal(first, vae(frames)[0])


def test_latent_dim_is_read_back_from_a_state_dict():
    assert latent_dim_of(VAE(latent_dim=12).state_dict()) == 12


def test_broadcast_decoder_adds_a_path_and_keeps_z_the_only_way_through(frames):
    vae = VAE(latent_dim=8, decoder="broadcast").eval()
    x_hat, mu, _ = vae(frames)
    assert x_hat.shape == (4, 3, 64, 64) and torch.equal(x_hat, vae.decode(mu))
    plain = VAE(latent_dim=8)
    assert set(plain.state_dict()) < set(vae.state_dict())  # deconv weights keep their names
    with torch.no_grad():  # the broadcast path really reaches the output
        vae.broadcast.net[-1].bias.fill_(5.0)
    assert not torch.allclose(vae.decode(mu), x_hat)


def test_the_decoder_kind_is_read_back_from_a_state_dict():
    for kind in ("deconv", "broadcast"):
        state = VAE(latent_dim=8, decoder=kind).state_dict()
        assert decoder_of(state) == kind
        rebuilt = vae_for(state)
        rebuilt.load_state_dict(state)  # strict: every key matches
        assert rebuilt.decoder_kind == kind and rebuilt.latent_dim == 8


def test_the_locator_maps_z_to_logits_over_pixel_positions_and_is_read_back():
    vae = VAE(latent_dim=8, locator=True)
    assert vae.locate(torch.zeros(3, 8)).shape == (3, 64 * 64)
    rebuilt = vae_for(vae.state_dict())
    rebuilt.load_state_dict(vae.state_dict())
    assert rebuilt.locator is not None and vae_for(VAE(latent_dim=8).state_dict()).locator is None
    with pytest.raises(ValueError, match="without a locator"):
        VAE(latent_dim=8).locate(torch.zeros(1, 8))


def test_the_coordinate_head_is_a_line_from_z_to_a_pixel_position_and_is_read_back():
    vae = VAE(latent_dim=8, coords=True)
    z = torch.randn(5, 8)
    assert vae.point(z).shape == (5, 2)
    midpoint = vae.point((z[:1] + z[1:2]) / 2)  # affine in z: a planner reads it with a line
    torch.testing.assert_close(midpoint, (vae.point(z[:1]) + vae.point(z[1:2])) / 2)
    rebuilt = vae_for(vae.state_dict())
    rebuilt.load_state_dict(vae.state_dict())
    assert rebuilt.coords is not None and vae_for(VAE(latent_dim=8).state_dict()).coords is None
    with pytest.raises(ValueError, match="without a coordinate head"):
        VAE(latent_dim=8).point(z)


def test_the_fourier_head_is_a_line_from_z_to_four_waves_per_axis_and_is_read_back():
    vae = VAE(latent_dim=8, fourier=True)
    z = torch.randn(5, 8)
    assert vae.waves(z).shape == (5, 16) and vae.waves(z).dtype == torch.float32
    assert vae.architecture()["fourier"] is True
    rebuilt = vae_for(vae.state_dict())
    rebuilt.load_state_dict(vae.state_dict())
    torch.testing.assert_close(rebuilt.waves(z), vae.waves(z))
    assert vae_for(VAE(latent_dim=8).state_dict()).fourier is None
    with pytest.raises(ValueError, match="without a Fourier head"):
        VAE(latent_dim=8).waves(z)


def test_the_mask_head_is_a_line_from_z_to_per_pixel_foreground_logits_starting_at_the_rate():
    vae = VAE(latent_dim=8, mask=True)
    rate = torch.full((1, 1, 64, 64), 0.001)
    rate[..., 60:62, 20:30] = 0.5  # a paddle's row: foreground half the time
    vae.init_mask_bias(rate)
    with torch.no_grad():
        vae.mask.weight.zero_()
        probability = torch.sigmoid(vae.foreground_logits(torch.randn(3, 8))).view(3, 64, 64)
    assert probability[:, 60, 25].tolist() == pytest.approx([0.5] * 3)
    assert probability[:, 10, 10].tolist() == pytest.approx([0.001] * 3, rel=1e-3)
    rebuilt = vae_for(vae.state_dict())
    assert rebuilt.mask is not None and vae_for(VAE(latent_dim=8).state_dict()).mask is None
    with pytest.raises(ValueError, match="without a mask head"):
        VAE(latent_dim=8).foreground_logits(torch.zeros(1, 8))


def test_base_channels_doubles_stage_by_stage_and_vae_for_rebuilds_the_width():
    vae = VAE(latent_dim=8, base_channels=8, mask=True)
    widths = [m.out_channels for m in vae.encoder if isinstance(m, torch.nn.Conv2d)]
    assert widths == [8, 16, 32, 64]
    assert vae.to_mu.in_features == 64 * 4 * 4
    rebuilt = vae_for(vae.state_dict())
    assert rebuilt.base_channels == 8
    rebuilt.load_state_dict(vae.state_dict())  # strict: every shape matches
    with pytest.raises(ValueError, match="base_channels must be at least 1"):
        VAE(base_channels=0)


def test_the_architecture_dict_rebuilds_the_model_and_a_pre_width_one_means_32_wide():
    vae = VAE(latent_dim=8, decoder="broadcast", locator=True, base_channels=8)
    again = vae_from_architecture({**vae.architecture(), "format_version": 1})
    again.load_state_dict(vae.state_dict())
    old = vae_from_architecture({"input_shape": [3, 64, 64], "latent_dim": 8, "mask": True})
    assert old.base_channels == 32 and old.mask is not None and old.locator is None


def test_the_model_s_defaults_are_the_training_defaults():
    built, defaults = VAE().architecture(), TrainConfig()
    assert (built["latent_dim"], built["decoder"], built["base_channels"]) == (
        defaults.latent_dim, defaults.decoder, defaults.base_channels)


def test_random_init_like_has_the_model_s_architecture_and_seeded_fresh_weights():
    model = VAE(latent_dim=6, base_channels=8, mask=True)  # a 32-wide one gets a 32-wide twin
    a, b = random_init_like(model, seed=5), random_init_like(model, seed=5)
    assert a.architecture() == model.architecture()
    assert torch.equal(a.to_mu.weight, b.to_mu.weight)
    assert not torch.equal(a.encoder[0].weight, model.encoder[0].weight)
    assert not torch.equal(a.to_mu.weight, random_init_like(model, seed=6).to_mu.weight)


def test_an_unknown_decoder_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="deconv, broadcast"):
        VAE(decoder="transformer")


def test_prior_samples_are_images():
    samples = VAE(latent_dim=8).sample(5, torch.Generator().manual_seed(0))
    assert samples.shape == (5, 3, 64, 64) and samples.min() >= 0 and samples.max() <= 1


@pytest.fixture
def trained_output(tmp_path: Path) -> Path:
    """best_model.pt etc. from a real one-epoch training at the issue's latent size."""
    cfg = TrainConfig(**tiny_train_flags("outputs/vae_training", epochs=1, latent_dim=32))
    data = load_or_collect(resolve_game(cfg.env_name), cfg.num_episodes, cfg.max_steps,
                           cfg.seed, progress=False)
    fit(cfg, *split_by_episode(data, cfg.val_split, cfg.seed))
    return tmp_path / "outputs" / "vae_training"


def _readme_load_block() -> str:
    """The README's python block after "The `.pt` files load with `weights_only=True`"."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    after = readme.split("The `.pt` files load with `weights_only=True`:", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_documented_load_line_works_verbatim_on_a_trained_output(trained_output):
    namespace: dict = {}
    exec(_readme_load_block(), namespace)  # the README's lines, as a user pastes them
    vae = namespace["vae"]
    loaded = registry.load_model(str(trained_output / "checkpoint_epoch_1.pt"))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in vae.state_dict().items())


class _Payload:
    """Unpickling this creates a file: proof that a loader ran code from a model file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _bad_model_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.pt"
    torch.save(VAE(latent_dim=8).state_dict(), good)
    files = {"missing": tmp_path / "missing.pt", "truncated": tmp_path / "truncated.pt",
             "text": tmp_path / "notes.pt", "foreign": tmp_path / "foreign.pt",
             "pickle": tmp_path / "payload.pt"}
    files["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["text"].write_text("not a model")
    torch.save({"weight": torch.zeros(3)}, files["foreign"])
    torch.save({"model": _Payload(tmp_path / "code-ran")}, files["pickle"])
    return files


@pytest.mark.parametrize("kind, message", [
    ("missing", "does not exist"),
    ("truncated", "is not a readable atari-vae model"),
    ("text", "is not a readable atari-vae model"),
    ("foreign", "is not a readable atari-vae model"),
    ("pickle", "pickled objects are never loaded"),
])
def test_bad_model_files_give_one_clear_error_and_never_run_code(tmp_path, kind, message):
    path = _bad_model_files(tmp_path)[kind]
    with pytest.raises(AtariVaeError) as err:
        registry.load_model(str(path))
    assert str(path) in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value) and "\x1b" not in str(err.value)
    assert "weights_only=False" not in str(err.value)  # never advise the unsafe way
    assert not (tmp_path / "code-ran").exists()


def test_every_torch_load_in_the_package_is_weights_only():
    calls = 0
    for source in (REPO / "atari_vae").glob("*.py"):
        text = source.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            depth, end = 1, match.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            assert "weights_only=True" in text[match.end():end], f"{source.name}: {match}"
            calls += 1
        assert "pickle.load" not in text and "allow_pickle=True" not in text, source.name
    assert calls >= 2
