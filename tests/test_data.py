"""The frame store as a cache of collections, the split by episode and the balanced game order."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from atari_vae.data import (
    balanced_order,
    cache_dir,
    cache_key,
    collect_episodes,
    epoch_length,
    load_games,
    load_or_collect,
    split_by_episode,
)
from atari_vae.envs import resolve_game
from atari_vae.store import INDEX_FILE, FrameRows
from tests.conftest import same_frames

BREAKOUT = resolve_game("Breakout")
PONG = resolve_game("Pong")


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of this test's own, so hits and misses are this test's doing."""
    path = tmp_path / "cache"
    monkeypatch.setenv("ATARI_VAE_CACHE_DIR", str(path))
    return path


def _store(cache: Path) -> Path:
    (path,) = [p for p in cache.iterdir() if p.is_dir()]
    return path


def test_cache_lives_where_the_environment_says(private_cache):
    assert cache_dir() == private_cache


def test_cache_hit_returns_identical_frames_without_collecting_again(private_cache):
    first = load_or_collect(BREAKOUT, 3, 40, seed=2, progress=False)
    store = _store(private_cache)
    stamps = {p.name: p.stat().st_mtime_ns for p in store.iterdir()}
    collected = []
    again = load_or_collect(BREAKOUT, 3, 40, seed=2, progress=False, on_episode=collected.append)
    assert same_frames(first, again) and collected == []
    assert {p.name: p.stat().st_mtime_ns for p in store.iterdir()} == stamps


def test_a_collector_waits_for_another_process_collecting_the_same_key_then_shares_its_frames(
        private_cache, caplog):
    key = cache_key(BREAKOUT, 2, 30, seed=5)
    private_cache.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from filelock import FileLock; "
         "lock = FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); "
         "sys.stdin.readline()", str(private_cache / f"{key}.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        loaded: list = []
        waiter = threading.Thread(target=lambda: loaded.append(
            load_or_collect(BREAKOUT, 2, 30, seed=5, progress=False)))
        with caplog.at_level(logging.INFO, logger="atari_vae.data"):
            waiter.start()
            deadline = time.monotonic() + 60
            while "waiting for another process" not in caplog.text:
                assert time.monotonic() < deadline and waiter.is_alive()
                time.sleep(0.05)
            assert not (private_cache / key).exists()  # nothing collected while it waits
            holder.communicate("\n", timeout=30)
            waiter.join(120)
    finally:
        holder.kill()
    assert not waiter.is_alive() and len(loaded[0]) > 0
    assert (private_cache / key).is_dir()


def _mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose mapping holds ``tensor``'s memory, from /proc/self/maps."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split()
        start, end = (int(x, 16) for x in span.split("-"))
        if start <= address < end:
            return rest[4] if len(rest) > 4 else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc")
def test_stored_frames_are_memory_mapped_from_the_store_not_loaded(private_cache):
    frames = load_or_collect(BREAKOUT, 3, 40, seed=2, progress=False).frames_uint8
    assert _mapped_file(frames) == str(_store(private_cache) / "frames.u8")
    assert _mapped_file(collect_episodes(BREAKOUT, 3, 40, seed=2, progress=False)
                        .frames_uint8) != str(_store(private_cache) / "frames.u8")


@pytest.mark.parametrize("damage", ["truncated frames", "empty frames", "empty index",
                                    "garbled index", "foreign index", "store is a file"])
def test_an_unreadable_store_is_reported_in_one_line_and_collected_again(private_cache, caplog,
                                                                         damage):
    load_or_collect(BREAKOUT, 2, 30, seed=3, progress=False)  # not kept: it maps the file
    first = collect_episodes(BREAKOUT, 2, 30, seed=3, progress=False)
    store = _store(private_cache)
    if damage == "truncated frames":  # as after a disk that lost the tail
        (store / "frames.u8").write_bytes((store / "frames.u8").read_bytes()[:200])
    elif damage.startswith("empty"):  # zero bytes, as a full disk leaves them
        (store / ("frames.u8" if damage == "empty frames" else INDEX_FILE)).write_bytes(b"")
    elif damage == "garbled index":
        (store / INDEX_FILE).write_text('{"format": "atari-vae-fr')
    elif damage == "foreign index":
        index = json.loads((store / INDEX_FILE).read_text())
        (store / INDEX_FILE).write_text(json.dumps({**index, "episode_lengths": [-1, "x"]}))
    else:
        for path in store.iterdir():
            path.unlink()
        store.rmdir()
        store.write_bytes(b"not a store")
    with caplog.at_level(logging.WARNING, logger="atari_vae.data"):
        again = load_or_collect(BREAKOUT, 2, 30, seed=3, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unreadable frame store" in warnings[0]
    assert "\n" not in warnings[0] and store.name in warnings[0]
    assert same_frames(first, again)
    assert same_frames(load_or_collect(BREAKOUT, 2, 30, seed=3, progress=False), first)
    assert not [p for p in store.iterdir() if ".partial-" in p.name]  # no temp files left


def test_an_old_npz_cache_is_refused_in_one_line_and_never_used(private_cache, caplog):
    # What COLLECTOR_VERSION 3 wrote: one .npz per key; its episodes are not this collector's.
    old = private_cache / "breakout-2ep-30steps-seed3-0123456789abcdef.npz"
    private_cache.mkdir()
    np.savez(old, frames=np.zeros((5, 3, 64, 64), np.uint8), episode_ids=np.zeros(5, np.int64),
             steps=np.arange(5))
    with caplog.at_level(logging.WARNING, logger="atari_vae.data"):
        frames = load_or_collect(BREAKOUT, 2, 30, seed=3, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and old.name in warnings[0] and "older collector" in warnings[0]
    assert same_frames(frames, collect_episodes(BREAKOUT, 2, 30, seed=3, progress=False))
    assert old.exists()  # the user's file: reported, not deleted


def test_a_cache_folder_that_cannot_be_written_costs_a_warning_not_the_run(
        tmp_path, monkeypatch, caplog):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("ATARI_VAE_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    with caplog.at_level(logging.WARNING, logger="atari_vae.data"):
        frames = load_or_collect(BREAKOUT, 2, 30, seed=3, progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "temporary store" in warnings[0]
    assert same_frames(frames, collect_episodes(BREAKOUT, 2, 30, seed=3, progress=False))


class Interrupted(Exception):
    pass


def _interrupt_after(count: int):
    seen = []

    def hook(number: int) -> None:
        seen.append(number)
        if len(seen) == count:
            raise Interrupted(f"stopped after {count} episodes")
    return hook


def _stored(cache: Path) -> list[int]:
    index = json.loads((_store(cache) / INDEX_FILE).read_text())
    assert not index["complete"]
    return index["episode_numbers"]


def test_an_interrupted_collection_resumes_where_it_stopped_and_equals_an_uninterrupted_one(
        private_cache):
    # 12 Breakout episodes of up to 300 steps, chains of 1 over 4 envs: episodes end out of
    # order (stored as they end); the finished store is in episode order all the same.
    with pytest.raises(Interrupted):
        load_or_collect(BREAKOUT, 12, 300, seed=7, progress=False,
                        on_episode=_interrupt_after(5))
    stored = _stored(private_cache)
    assert len(stored) == 5
    resumed_episodes = []
    resumed = load_or_collect(BREAKOUT, 12, 300, seed=7, progress=False,
                              on_episode=resumed_episodes.append)
    assert sorted(resumed_episodes) == sorted(set(range(12)) - set(stored))  # none twice
    assert same_frames(resumed, collect_episodes(BREAKOUT, 12, 300, seed=7, progress=False))
    assert resumed.episode_ids.unique_consecutive().tolist() == list(range(12))


KILLED_COLLECTION = """
import os, signal, sys
from atari_vae.data import load_or_collect
from atari_vae.envs import resolve_game

seen = []

def die(number):
    seen.append(number)
    if len(seen) == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)

load_or_collect(resolve_game("Breakout"), 20, 60, seed=8, progress=False, on_episode=die)
"""


def test_a_collection_killed_with_sigkill_resumes_to_the_uninterrupted_store(private_cache):
    # Chains of 2: the resumed run replays the stored half of a chain it stopped in.
    done = subprocess.run([sys.executable, "-c", KILLED_COLLECTION, "9"], capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    stored = _stored(private_cache)
    assert len(stored) == 9
    resumed_episodes = []
    resumed = load_or_collect(BREAKOUT, 20, 60, seed=8, progress=False,
                              on_episode=resumed_episodes.append)
    assert sorted(resumed_episodes) == sorted(set(range(20)) - set(stored))
    assert same_frames(resumed, collect_episodes(BREAKOUT, 20, 60, seed=8, progress=False))


@pytest.mark.parametrize("change", [dict(game=PONG), dict(num_episodes=4), dict(max_steps=41),
                                    dict(seed=3)])
def test_cache_key_changes_with_each_argument_that_determines_the_frames(change):
    base = dict(game=BREAKOUT, num_episodes=3, max_steps=40, seed=2)
    assert cache_key(**{**base, **change}) != cache_key(**base)


def test_cache_key_is_the_same_in_another_process():
    # A key that varied between processes (say, with Python's hash seed) would never find the
    # frames a previous run stored.
    code = ("from atari_vae.data import cache_key; from atari_vae.envs import resolve_game; "
            "print(cache_key(resolve_game('Breakout'), 3, 40, 2))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert other.stdout.strip() == cache_key(BREAKOUT, 3, 40, 2)


@pytest.mark.parametrize("val_split, n_val", [(0.2, 2), (0.5, 5), (0.01, 1), (0.99, 9)])
def test_split_is_by_episode_with_the_requested_share_and_at_least_one_each(val_split, n_val):
    frames = load_or_collect(BREAKOUT, 10, 20, seed=4, progress=False)
    train, val = split_by_episode(frames, val_split, seed=0)
    train_eps, val_eps = set(train.episode_ids.tolist()), set(val.episode_ids.tolist())
    assert not train_eps & val_eps
    assert train_eps | val_eps == set(range(10))
    assert len(val_eps) == n_val
    assert len(train) + len(val) == len(frames)


def test_split_parts_are_views_that_read_the_same_frames_as_a_copy():
    frames = load_or_collect(BREAKOUT, 10, 20, seed=4, progress=False)
    train, val = split_by_episode(frames, 0.2, seed=0)
    assert isinstance(train.frames_uint8, FrameRows) and isinstance(val.frames_uint8, FrameRows)
    is_val = torch.isin(frames.episode_ids, val.episode_ids.unique())
    assert torch.equal(val.frames_uint8[:], frames.frames_uint8[is_val])
    index = torch.tensor([len(train) - 1, 0, 5, 5])
    assert torch.equal(train.frames_uint8[index], frames.frames_uint8[~is_val][index])


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
    assert isinstance(frames.frames_uint8, FrameRows)  # the stores are mixed, not copied
    order = torch.randperm(len(frames), generator=torch.Generator().manual_seed(0))[:50]
    in_memory = torch.cat([load_or_collect(g, 4, 20, seed=4, progress=False).frames_uint8
                           for g in (BREAKOUT, PONG)])
    assert torch.equal(frames.frames_uint8[order], in_memory[order])


def test_balanced_order_gives_every_game_an_equal_share_of_an_epoch_as_long_as_the_data():
    game_ids = torch.tensor([0] * 10 + [1] * 3 + [2] * 8)
    order = balanced_order(game_ids, torch.Generator().manual_seed(0))
    assert len(order) == epoch_length(game_ids) == 21
    assert torch.bincount(game_ids[order]).tolist() == [7, 7, 7]
    # the larger games give distinct frames; the smallest covers all its frames
    assert len(set(order[game_ids[order] == 0].tolist())) == 7
    assert set(order[game_ids[order] == 1].tolist()) == {10, 11, 12}
    assert set(order[game_ids[order] == 2].tolist()) <= set(range(13, 21))
    assert len(set(order[game_ids[order] == 2].tolist())) == 7
    assert not torch.equal(order, balanced_order(game_ids, torch.Generator().manual_seed(1)))


def test_balanced_order_draws_a_fresh_subset_of_a_large_game_each_epoch():
    game_ids = torch.tensor([0] * 100 + [1] * 2)
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        order = balanced_order(game_ids, generator)
        seen |= set(order[game_ids[order] == 0].tolist())
    assert len(seen) > 90  # 51 of 100 frames an epoch, different ones each time


def test_balanced_order_of_one_game_is_a_permutation():
    order = balanced_order(torch.zeros(7, dtype=torch.long), torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(7))


def test_balanced_order_with_equal_weights_gives_every_frame_once():
    order = balanced_order(torch.zeros(9, dtype=torch.long), torch.Generator().manual_seed(0),
                           torch.full((9,), 3.0))
    assert sorted(order.tolist()) == list(range(9))


def test_balanced_order_draws_each_frame_in_proportion_to_its_weight_within_its_game():
    game_ids = torch.tensor([0] * 10 + [1] * 10)
    weights = torch.ones(20)
    weights[[0, 1, 10]] = 4.0
    order = balanced_order(game_ids, torch.Generator().manual_seed(0), weights)
    counts = torch.bincount(order, minlength=20)
    assert len(order) == 20 and torch.bincount(game_ids[order]).tolist() == [10, 10]
    # game 0: 10 draws over weight 16, so frames 0 and 1 come 2.5 times (2 or 3), the rest 0-1
    assert all(c in (2, 3) for c in counts[[0, 1]].tolist())
    assert counts[2:10].max() <= 1 and counts[11:].max() <= 1
    assert counts[10] in (3, 4)  # 10 draws over weight 13
