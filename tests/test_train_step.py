"""train_step: the loss of a batch from the model's heads, and the clipped backward pass."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from atari_vae.config import TrainConfig
from atari_vae.data import load_games
from atari_vae.envs import parse_games, to_float
from atari_vae.metrics import game_references
from atari_vae.train_step import GRAD_CLIP_NORM, backward_step, build_model, loss_terms
from tests.conftest import tiny_train_flags

HEADS = {"loc_weight": "locator", "coord_weight": "coords", "fourier_weight": "fourier",
         "mask_weight": "mask"}


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """Real Breakout frames (random play: the ball in some of them) and their references."""
    cfg = TrainConfig(**tiny_train_flags(tmp_path_factory.mktemp("out")))
    data = load_games(parse_games(cfg.env_name), cfg.num_episodes, cfg.max_steps, cfg.seed,
                      progress=False)
    return data, game_references(data.frames_uint8, data.game_ids, 1)


def _all_heads(**overrides: object) -> TrainConfig:
    return TrainConfig(latent_dim=8, decoder="broadcast", obj_weight=3.0, loc_weight=1.0,
                       coord_weight=1.0, fourier_weight=1.0, mask_weight=1.0, **overrides)


@pytest.mark.parametrize("weight", sorted(HEADS))
def test_build_model_gives_a_head_exactly_when_its_loss_weight_is_on(weight):
    on = build_model(TrainConfig(latent_dim=8, **{w: 1.0 if w == weight else 0.0 for w in HEADS}))
    assert [getattr(on, HEADS[w]) is not None for w in sorted(HEADS)] == [
        w == weight for w in sorted(HEADS)]


def test_each_state_term_adds_to_the_reconstruction_term_and_never_to_the_kl(frames):
    data, refs = frames
    cfg = _all_heads()
    torch.manual_seed(0)
    model = build_model(cfg).eval()  # eval: z is the posterior mean, so runs compare exactly
    x = to_float(data.frames_uint8[:])
    with torch.no_grad():
        def terms(config: TrainConfig):
            return loss_terms(model, x, refs.means, refs.backgrounds, config, torch.float32)[0]
        every = terms(cfg)
        plain = terms(TrainConfig(**{**asdict(cfg), **dict.fromkeys(HEADS, 0.0),
                                     "obj_weight": 0.0}))
        no_waves = terms(TrainConfig(**{**asdict(cfg), "fourier_weight": 0.0}))
    assert every.recon > no_waves.recon > plain.recon > 0
    assert every.kl == no_waves.kl == plain.kl
    assert every.total == pytest.approx((every.recon + cfg.kl_weight * every.kl).item(), rel=1e-5)


def test_a_backward_step_replaces_the_gradients_and_clips_their_norm(frames):
    data, refs = frames
    cfg = _all_heads(kl_weight=1e6)  # a huge KL weight: gradients far past the clip norm
    torch.manual_seed(0)
    model = build_model(cfg)
    step = backward_step(model, data.frames_uint8, data.game_ids, refs, cfg, torch.float32)
    index = torch.arange(32)

    def grads() -> torch.Tensor:
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    torch.manual_seed(1)
    step(index)
    first = grads().clone()
    assert first.norm().item() == pytest.approx(GRAD_CLIP_NORM, rel=1e-4)
    torch.manual_seed(1)  # the same z sample: the same gradients, not twice them
    step(index)
    torch.testing.assert_close(grads(), first)
