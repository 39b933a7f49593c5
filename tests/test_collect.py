"""Playing a collection's episodes: deterministic per seed, whatever the env count."""

from __future__ import annotations

import torch

from atari_vae.collect import chain_length
from atari_vae.data import collect_episodes
from atari_vae.envs import resolve_game
from tests.conftest import same_frames

BREAKOUT = resolve_game("Breakout")


def test_collection_is_deterministic_for_a_seed_and_differs_between_seeds():
    first = collect_episodes(BREAKOUT, 3, 40, seed=5, progress=False)
    again = collect_episodes(BREAKOUT, 3, 40, seed=5, progress=False)
    other = collect_episodes(BREAKOUT, 3, 40, seed=6, progress=False)
    assert same_frames(first, again)
    assert not torch.equal(first.frames_uint8[:len(other)], other.frames_uint8[:len(first)])


def test_frames_of_a_seed_do_not_depend_on_how_many_envs_play_them():
    # 20 episodes come in chains of 2 from one seeded reset; which env plays a chain, and when
    # the chains finish, must not matter.
    assert chain_length(20) == 2
    reference = collect_episodes(BREAKOUT, 20, 60, seed=3, progress=False)
    for num_envs in (1, 3):
        assert same_frames(collect_episodes(BREAKOUT, 20, 60, seed=3, progress=False,
                                      num_envs=num_envs), reference)


def test_collected_frames_are_64x64_rgb_episodes_no_longer_than_max_steps():
    frames = collect_episodes(BREAKOUT, 5, 30, seed=1, progress=False)
    assert frames.frames_uint8.shape[1:] == (3, 64, 64)
    assert frames.frames_uint8.dtype == torch.uint8
    assert frames.episode_ids.unique().tolist() == [0, 1, 2, 3, 4]
    for episode in range(5):
        steps = frames.steps[frames.episode_ids == episode]
        assert steps.tolist() == list(range(len(steps))) and 1 <= len(steps) <= 30
    assert frames.frames_uint8.float().std() > 0  # real pictures, not a blank buffer
