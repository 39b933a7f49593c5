"""Seeded episodes on real ALE vector envs, and the serve rule in ``play`` and ``AutoServe``."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from atari_vae.envs import fire_action, make_env, resolve_game
from atari_vae.rollout import AutoServe, EnvPool, RandomActor, play

BREAKOUT = resolve_game("Breakout")
BREAKOUT_LIVES = 5


def never_fire(frames: np.ndarray, envs: np.ndarray) -> np.ndarray:
    """An actor that only ever plays NOOP: Breakout never serves for it."""
    return np.zeros(len(envs), dtype=np.int64)


@pytest.fixture
def pool():
    envs = EnvPool(BREAKOUT, max_steps=400)
    yield envs
    envs.close()


def test_seeded_episodes_replay_exactly(pool):
    seeds = np.array([3, 4, 3])
    runs = [play(pool.get(3), seeds, RandomActor(4, 0), 40, record=True) for _ in range(2)]
    np.testing.assert_array_equal(runs[0].scores, runs[1].scores)
    np.testing.assert_array_equal(runs[0].frames, runs[1].frames)
    assert runs[0].frames.shape[1:] == (3, 64, 64) and runs[0].lengths.max() <= 40


def test_a_breakout_player_that_never_fires_waits_out_the_step_cap_unless_the_env_serves(pool):
    seeds = np.arange(4)
    waiting = play(pool.get(4), seeds, never_fire, 400)
    assert waiting.lengths.tolist() == [400] * 4 and waiting.scores.tolist() == [0.0] * 4
    served = play(pool.get(4), seeds, never_fire, 400, serve_action=fire_action(BREAKOUT))
    assert (served.lengths < 400).all()  # every life lost: game over before the cap


def _lives_lost_at(seed: int) -> list[int]:
    """The steps after which a NOOP-playing, served Breakout episode had one life fewer."""
    env = AutoServe(make_env(BREAKOUT))
    try:
        _, info = env.reset(seed=seed)
        lives, lost_at, step, done = info["lives"], [], 0, False
        while not done:
            _, _, terminated, truncated, info = env.step(0)
            step += 1
            if info["lives"] < lives:
                lost_at.append(step)
            lives, done = info["lives"], terminated or truncated
    finally:
        env.close()
    return lost_at


def test_the_serve_replaces_the_first_action_and_the_one_after_each_lost_life_only(pool):
    episode = play(pool.get(1), np.array([9]), never_fire, 400, record=True,
                   serve_action=fire_action(BREAKOUT))
    fired = np.flatnonzero(episode.actions == fire_action(BREAKOUT)).tolist()
    lost_at = _lives_lost_at(9)  # the same rule in the gymnasium wrapper
    assert len(lost_at) == BREAKOUT_LIVES and fired == [0] + lost_at[:-1]
    assert len(episode.actions) == episode.lengths[0] == lost_at[-1]



class _ActionLog(gym.Wrapper):
    """Records the actions that reach the real env under ``AutoServe``."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.sent: list[int] = []

    def step(self, action):
        self.sent.append(int(action))
        return self.env.step(action)


def test_auto_serve_wrapper_sends_fire_first_and_after_each_lost_life_only():
    env = AutoServe(log := _ActionLog(make_env(BREAKOUT)))
    try:
        _, info = env.reset(seed=9)
        lives, lost_at, terminated = info["lives"], [], False
        while not terminated and len(log.sent) < 400:
            _, _, terminated, _, info = env.step(0)
            if info["lives"] < lives:
                lost_at.append(len(log.sent))
            lives = info["lives"]
    finally:
        env.close()
    assert terminated and lives == 0
    fired = [t for t, action in enumerate(log.sent) if action == env.serve_action]
    assert fired == [0] + lost_at[:-1]  # no serve after the last life: the game is over


def test_a_game_without_fire_has_no_serve_action():
    assert fire_action(resolve_game("Breakout")) == 1
    assert fire_action(resolve_game("Freeway")) is None
