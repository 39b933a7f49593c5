"""Game names and the one preprocessing function (no train/serve skew), on the real emulator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import atari_vae
from atari_vae.data import collect_episodes
from atari_vae.envs import (
    FRAMESKIP,
    STICKY_ACTION_PROB,
    make_env,
    parse_games,
    resize_uint8,
    resolve_game,
)
from atari_vae.errors import ConfigError


@pytest.mark.parametrize("name, rom_id, title", [
    ("Breakout", "breakout", "Breakout"),
    ("breakout", "breakout", "Breakout"),
    ("BREAKOUT", "breakout", "Breakout"),
    ("ALE/Breakout-v5", "breakout", "Breakout"),
    ("SpaceInvaders", "space_invaders", "SpaceInvaders"),
    ("space_invaders", "space_invaders", "SpaceInvaders"),
    ("ALE/SpaceInvaders-v5", "space_invaders", "SpaceInvaders"),
    (" Pong ", "pong", "Pong"),
    ("ms_pacman", "ms_pacman", "MsPacman"),
])
def test_game_names_resolve_in_any_spelling(name, rom_id, title):
    game = resolve_game(name)
    assert (game.rom_id, game.title, game.env_id) == (rom_id, title, f"ALE/{title}-v5")


def test_resolved_env_id_is_a_real_gymnasium_env():
    env = make_env(resolve_game("space_invaders"))
    try:
        obs, _ = env.reset(seed=0)
        assert obs.shape == (210, 160, 3) and obs.dtype == np.uint8
    finally:
        env.close()


@pytest.mark.parametrize("name, suggestion", [
    ("Breakot", "breakout"),
    ("spaceinvader", "space_invaders"),
    ("ALE/Pongg-v5", "pong"),
])
def test_unknown_game_is_a_config_error_naming_close_matches(name, suggestion):
    with pytest.raises(ConfigError) as err:
        resolve_game(name)
    message = str(err.value)
    assert f"unknown game {name!r}" in message and suggestion in message


def test_unknown_game_without_close_match_still_says_what_is_allowed():
    with pytest.raises(ConfigError, match="allowed: any ALE ROM"):
        resolve_game("Minecraft")


def test_game_lists_are_split_on_commas_and_deduplicated_in_order():
    games = parse_games("Pong,breakout,ALE/Pong-v5, SpaceInvaders")
    assert [g.title for g in games] == ["Pong", "Breakout", "SpaceInvaders"]


@pytest.mark.parametrize("value", ["", " , "])
def test_empty_game_list_is_a_config_error(value):
    with pytest.raises(ConfigError, match="--env_name"):
        parse_games(value)


def _raw_episode(rom_id: str, seed: int, max_steps: int) -> np.ndarray:
    """The collector's emulator settings and random actions, at the native 210x160 size."""
    from ale_py.vector_env import AtariVectorEnv

    env = AtariVectorEnv(rom_id, num_envs=1, frameskip=FRAMESKIP,
                         repeat_action_probability=STICKY_ACTION_PROB,
                         max_num_frames_per_episode=max_steps * FRAMESKIP, img_height=210,
                         img_width=160, grayscale=False, stack_num=1, maxpool=False,
                         noop_max=0, use_fire_reset=False, reward_clipping=False)
    rng = np.random.default_rng([seed, 0])  # env 0's own action stream
    try:
        obs, _ = env.reset(seed=seed)
        frames, done = [obs[0, 0]], False
        while not done:
            obs, _, terminated, truncated, _ = env.step(
                np.array([rng.integers(env.single_action_space.n)]))
            frames.append(obs[0, 0])
            done = bool(terminated[0] or truncated[0])
    finally:
        env.close()
    return np.stack(frames)


@pytest.mark.parametrize("game, seed", [("Breakout", 3), ("SpaceInvaders", 11)])
def test_preprocess_of_raw_frames_equals_the_collected_training_frames_bit_for_bit(game, seed):
    max_steps = 50
    g = resolve_game(game)
    raw = _raw_episode(g.rom_id, seed, max_steps)
    collected = collect_episodes(g, 1, max_steps, seed, progress=False)
    n = len(collected)
    assert n == min(len(raw), max_steps)
    assert torch.equal(resize_uint8(raw[:n]), collected.frames_uint8)
    assert torch.equal(atari_vae.preprocess(raw[:n]), collected.frames_uint8.float() / 255)


def test_preprocess_gives_float_frames_in_unit_range_for_one_frame_and_a_batch():
    env = make_env(resolve_game("Breakout"))
    try:
        obs = [env.reset(seed=1)[0]]
        for _ in range(4):
            obs.append(env.step(env.action_space.sample())[0])
    finally:
        env.close()
    one = atari_vae.preprocess(obs[0])
    batch = atari_vae.preprocess(np.stack(obs))
    assert one.shape == (1, 3, 64, 64) and batch.shape == (5, 3, 64, 64)
    assert one.dtype == batch.dtype == torch.float32
    assert float(batch.min()) >= 0.0 and float(batch.max()) <= 1.0 and float(batch.max()) > 0.1
    assert torch.equal(batch[:1], one)
    assert torch.equal(atari_vae.preprocess(torch.from_numpy(np.stack(obs))), batch)


@pytest.mark.parametrize("value", [0, 37, 255])
def test_preprocess_keeps_a_uniform_frame_uniform(value):
    frame = np.full((210, 160, 3), value, dtype=np.uint8)
    assert torch.equal(atari_vae.preprocess(frame), torch.full((1, 3, 64, 64), value / 255))


def test_preprocess_keeps_channels_apart():
    frame = np.zeros((210, 160, 3), dtype=np.uint8)
    frame[..., 1] = 200
    out = atari_vae.preprocess(frame)
    assert out[:, 1].eq(200 / 255).all() and out[:, [0, 2]].eq(0).all()


@pytest.mark.parametrize("bad", [
    np.zeros((210, 160, 3), dtype=np.float32),
    np.zeros((210, 160), dtype=np.uint8),
    np.zeros((3, 210, 160), dtype=np.uint8),
])
def test_preprocess_rejects_frames_that_are_not_raw_uint8_rgb(bad):
    with pytest.raises(ValueError, match="expected uint8 frames"):
        atari_vae.preprocess(bad)
