"""AtariARI's RAM annotations and categories, and frames labelled with the RAM of their step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atari_vae.envs import resolve_game
from atari_vae.state_labels import (
    categories_of,
    collect_labelled,
    entropy_nats,
    is_annotated,
    is_coordinate,
    load_or_collect_labelled,
    variables,
)


def test_the_issue_s_breakout_and_pong_addresses_and_expanded_byte_lists():
    breakout = variables(resolve_game("Breakout"))
    assert (breakout["ball_x"], breakout["ball_y"], breakout["player_x"]) == (99, 101, 72)
    assert breakout["blocks_hit_count"] == 77 and breakout["score"] == 84
    assert [breakout[f"block_bit_map_{i}"] for i in range(30)] == list(range(30))
    pong = variables(resolve_game("Pong"))
    assert (pong["ball_x"], pong["ball_y"], pong["player_y"], pong["enemy_y"]) == (49, 54, 51, 50)
    assert variables(resolve_game("SpaceInvaders"))["player_x"] == 28
    assert is_annotated(resolve_game("space_invaders")) and is_annotated(resolve_game("MsPacman"))
    assert not is_annotated(resolve_game("Alien")) and variables(resolve_game("Alien")) == {}


@pytest.mark.parametrize("name, categories", [
    ("ball_x", ("small_object_localization",)),
    ("missiles_y", ("small_object_localization",)),
    ("player_missile_x1", ("small_object_localization",)),  # a missile, though the player's
    ("player_x", ("agent_localization",)),
    ("enemy_y", ("other_localization",)),
    ("score", ("score_clock_lives_display",)),
    ("num_lives_direction", ("score_clock_lives_display", "misc")),
    ("block_bit_map_3", ("misc",)),
    ("blocks_hit_count", ("misc",)),
    ("angle_of_tank", ()),
])
def test_categories_follow_atariari_s_name_rules(name, categories):
    assert categories_of(name) == categories
    assert is_coordinate(name) == any("localization" in c for c in categories)


def test_entropy_is_zero_for_a_constant_and_log_k_for_k_equally_likely_values():
    labels = np.stack([np.zeros(8, dtype=np.int64), np.arange(8) % 4], axis=1)
    assert entropy_nats(labels) == pytest.approx([0.0, np.log(4)])


def _paddle_x(frames: np.ndarray) -> np.ndarray:
    """Column centroid of the paddle: red pixels in the paddle's row (58) of a 64x64 frame."""
    rows = frames[:, 0, 58:59, 2:62].astype(float)  # red channel, inside the side walls
    weight = (rows > 100).sum(axis=1)
    return (weight * np.arange(2, 62)).sum(axis=1) / np.maximum(weight.sum(axis=1), 1)


def test_each_frame_carries_the_ram_of_its_own_step():
    labelled = collect_labelled(resolve_game("Breakout"), 300, 200, seed=7)
    assert labelled.frames_uint8.shape[1:] == (3, 64, 64) and labelled.ram.shape[1] == 128
    assert len(labelled.frames_uint8) == len(labelled.ram) == len(labelled.episode_ids) >= 300
    player_x = labelled.labels({"player_x": 72})[:, 0].astype(float)
    paddle = _paddle_x(labelled.frames_uint8.numpy())
    same = np.isin(labelled.episode_ids[1:], labelled.episode_ids[:-1])

    def residual(x: np.ndarray, y: np.ndarray) -> float:
        fit = np.polyval(np.polyfit(x, y, 1), x)
        return float(np.std(y - fit))

    aligned = residual(player_x[1:][same], paddle[1:][same])
    ram_before = residual(player_x[:-1][same], paddle[1:][same])
    ram_after = residual(player_x[1:][same], paddle[:-1][same])
    assert aligned < 0.5 * min(ram_before, ram_after)
    again = collect_labelled(resolve_game("Breakout"), 300, 200, seed=7)
    assert np.array_equal(again.ram, labelled.ram)  # deterministic in the seed


def test_labelled_frames_are_cached_and_read_back_identically(tmp_path, monkeypatch):
    monkeypatch.setenv("ATARI_VAE_CACHE_DIR", str(tmp_path / "cache"))
    game = resolve_game("Pong")
    first = load_or_collect_labelled(game, 150, 100, seed=3)
    (cached,) = (tmp_path / "cache").glob("labelled-*.npz")
    second = load_or_collect_labelled(game, 150, 100, seed=3)
    assert torch.equal(first.frames_uint8, second.frames_uint8)
    assert np.array_equal(first.ram, second.ram)
    assert np.array_equal(first.episode_ids, second.episode_ids)
    np.savez(cached, frames=first.frames_uint8.numpy(), ram=np.zeros_like(first.ram),
             episode_ids=first.episode_ids)
    assert not load_or_collect_labelled(game, 150, 100, seed=3).ram.any()  # read, not replayed
    cached.write_bytes(b"truncated")
    third = load_or_collect_labelled(game, 150, 100, seed=3)  # an unreadable file: collect again
    assert np.array_equal(third.ram, first.ram)
