"""Collection, the frame cache, the split by episode and the balanced multi-game order."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from atari_vae.data import (
    FrameSet,
    balanced_order,
    cache_dir,
    cache_key,
    collect_episodes,
    load_games,
    load_or_collect,
    split_by_episode,
)
from atari_vae.envs import resolve_game

BREAKOUT = resolve_game("Breakout")
PONG = resolve_game("Pong")


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of this test's own, so hits and misses are this test's doing."""
    path = tmp_path / "cache"
    monkeypatch.setenv("ATARI_VAE_CACHE_DIR", str(path))
    return path


def _same(a: FrameSet, b: FrameSet) -> bool:
    return all(torch.equal(getattr(a, f.name), getattr(b, f.name))
               for f in dataclasses.fields(FrameSet) if f.name != "games") and a.games == b.games


def test_collection_is_deterministic_for_a_seed_and_differs_between_seeds():
    first = collect_episodes(BREAKOUT, 3, 40, seed=5, progress=False)
    again = collect_episodes(BREAKOUT, 3, 40, seed=5, progress=False)
    other = collect_episodes(BREAKOUT, 3, 40, seed=6, progress=False)
    assert _same(first, again)
    assert not torch.equal(first.frames_uint8[:len(other)], other.frames_uint8[:len(first)])


def test_asynchronous_collection_yields_the_frames_of_lockstep_collection():
    # Which envs a step returns depends on thread timing; the frames must not.
    lockstep = collect_episodes(BREAKOUT, 10, 60, seed=3, progress=False, batch_size=8)
    for batch_size in (1, 3):
        assert _same(collect_episodes(BREAKOUT, 10, 60, seed=3, progress=False,
                                      batch_size=batch_size), lockstep)


def test_collected_frames_are_64x64_rgb_episodes_no_longer_than_max_steps():
    frames = collect_episodes(BREAKOUT, 5, 30, seed=1, progress=False)
    assert frames.frames_uint8.shape[1:] == (3, 64, 64)
    assert frames.frames_uint8.dtype == torch.uint8
    assert frames.episode_ids.unique().tolist() == [0, 1, 2, 3, 4]
    for episode in range(5):
        steps = frames.steps[frames.episode_ids == episode]
        assert steps.tolist() == list(range(len(steps))) and 1 <= len(steps) <= 30
    assert frames.frames_uint8.float().std() > 0  # real pictures, not a blank buffer


def test_cache_lives_where_the_environment_says(private_cache):
    assert cache_dir() == private_cache


def test_cache_hit_returns_identical_frames_without_collecting_again(private_cache):
    first = load_or_collect(BREAKOUT, 3, 40, seed=2, progress=False)
    files = list(private_cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"
    stamp = files[0].stat().st_mtime_ns
    again = load_or_collect(BREAKOUT, 3, 40, seed=2, progress=False)
    assert _same(first, again)
    assert list(private_cache.iterdir()) == files and files[0].stat().st_mtime_ns == stamp


def _npz(**arrays: np.ndarray):
    def write(path: Path) -> None:
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)
    return write


UNREADABLE = {
    "truncated": lambda path: path.write_bytes(path.read_bytes()[:200]),  # as after a crash
    "empty": lambda path: path.write_bytes(b""),
    "not a zip": lambda path: path.write_bytes(b"\x00" * 5000),
    "pickled arrays": _npz(frames=np.array([object()]), episode_ids=np.zeros(1),
                           steps=np.zeros(1)),
    "frames of another shape": _npz(frames=np.zeros((2, 64, 64, 3), np.uint8),
                                    episode_ids=np.zeros(2), steps=np.zeros(2)),
}


@pytest.mark.parametrize("damage", UNREADABLE.values(), ids=UNREADABLE.keys())
def test_an_unreadable_cache_file_of_any_kind_is_reported_in_one_line_and_collected_again(
        private_cache, caplog, damage):
    first = load_or_collect(BREAKOUT, 2, 30, seed=3, progress=False)
    (path,) = private_cache.iterdir()
    damage(path)
    with caplog.at_level(logging.WARNING, logger="atari_vae.data"):
        again = load_or_collect(BREAKOUT, 2, 30, seed=3, progress=False)
    assert _same(first, again)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.startswith(f"unreadable cache file {path} (") and "\n" not in warning
    assert warning.endswith("); collecting again")
    assert _same(load_or_collect(BREAKOUT, 2, 30, seed=3, progress=False), first)
    assert [p.name for p in private_cache.iterdir()] == [path.name]  # rewritten, no temp files


@pytest.mark.parametrize("change", [dict(game=PONG), dict(num_episodes=4), dict(max_steps=41),
                                    dict(seed=3)])
def test_cache_key_changes_with_each_argument_that_determines_the_frames(change):
    base = dict(game=BREAKOUT, num_episodes=3, max_steps=40, seed=2)
    assert cache_key(**base) == cache_key(**dict(base))
    assert cache_key(**{**base, **change}) != cache_key(**base)


@pytest.mark.parametrize("val_split, n_val", [(0.2, 2), (0.5, 5), (0.01, 1), (0.99, 9)])
def test_split_is_by_episode_with_the_requested_share_and_at_least_one_each(val_split, n_val):
    frames = load_or_collect(BREAKOUT, 10, 20, seed=4, progress=False)
    train, val = split_by_episode(frames, val_split, seed=0)
    train_eps, val_eps = set(train.episode_ids.tolist()), set(val.episode_ids.tolist())
    assert not train_eps & val_eps
    assert train_eps | val_eps == set(range(10))
    assert len(val_eps) == n_val
    assert len(train) + len(val) == len(frames)


def test_split_depends_on_the_seed_only():
    frames = load_or_collect(BREAKOUT, 10, 20, seed=4, progress=False)
    a = split_by_episode(frames, 0.3, seed=1)[1].episode_ids.unique()
    b = split_by_episode(frames, 0.3, seed=1)[1].episode_ids.unique()
    others = {tuple(split_by_episode(frames, 0.3, seed=s)[1].episode_ids.unique().tolist())
              for s in range(2, 8)}
    assert torch.equal(a, b) and len(others) > 1


def test_multi_game_frames_keep_episodes_unique_and_split_within_each_game():
    frames = load_games([BREAKOUT, PONG], 4, 20, seed=4, progress=False)
    assert frames.games == ("Breakout", "Pong")
    per_game = [set(frames.episode_ids[frames.game_ids == g].tolist()) for g in (0, 1)]
    assert len(per_game[0]) == len(per_game[1]) == 4 and not per_game[0] & per_game[1]
    train, val = split_by_episode(frames, 0.25, seed=0)
    for game in (0, 1):
        assert (val.game_ids == game).any() and (train.game_ids == game).any()
    assert torch.equal(frames.for_game("Pong").frames_uint8,
                       load_or_collect(PONG, 4, 20, seed=4, progress=False).frames_uint8)


def test_balanced_order_gives_every_game_equally_many_frames_per_epoch():
    game_ids = torch.tensor([0] * 10 + [1] * 3 + [2] * 6)
    order = balanced_order(game_ids, torch.Generator().manual_seed(0))
    assert torch.bincount(game_ids[order]).tolist() == [10, 10, 10]
    # the largest game is seen exactly once; the smaller ones cover all their frames
    assert sorted(order[game_ids[order] == 0].tolist()) == list(range(10))
    assert set(order[game_ids[order] == 1].tolist()) == {10, 11, 12}
    assert set(order[game_ids[order] == 2].tolist()) == set(range(13, 19))
    assert not torch.equal(order, balanced_order(game_ids, torch.Generator().manual_seed(1)))


def test_balanced_order_of_one_game_is_a_permutation():
    order = balanced_order(torch.zeros(7, dtype=torch.long), torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(7))
