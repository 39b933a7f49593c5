"""Seeded episodes on ale-py's vector env, played in lockstep by batched actors.

Every env plays one episode from a reset with its own seed (sticky actions included, so the
same seed and actions give the same episode), until game over or ``max_steps`` agent steps.
Observations are the vector env's 64x64 RGB frames, bit-exact with ``preprocess`` of the raw
frame, so a controller trained here acts the same on ``make_env``'s raw observations. With a
``serve_action`` the env serves for the actor (``AutoServe`` is the same rule for one gymnasium
env).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from atari_vae.controller import LinearController, encode_frames, make_features
from atari_vae.envs import Game, fire_in, make_vector_env

# (frames (n, 3, 64, 64) uint8 of the envs still playing, their env indices) -> (n,) actions
Actor = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class Episodes:
    """Scores and lengths per env; with ``record``, env 0's frames and actions."""

    scores: np.ndarray  # (N,) float64: summed (unclipped) rewards
    lengths: np.ndarray  # (N,) int64: agent steps
    frames: np.ndarray | None = None  # (T, 3, 64, 64) uint8, the frames env 0 acted on
    actions: np.ndarray | None = None  # (T,) int64


class EnvPool:
    """Vector envs by env count, each made once (a ROM load per env) and reused."""

    def __init__(self, game: Game, max_steps: int) -> None:
        self.game, self.max_steps = game, max_steps
        self._envs: dict[int, object] = {}

    def get(self, num_envs: int):
        if num_envs not in self._envs:
            # lockstep (batch = num_envs): every env steps every time, seeds are ours
            self._envs[num_envs] = make_vector_env(self.game, num_envs, self.max_steps,
                                                   num_envs)
        return self._envs[num_envs]

    def n_actions(self) -> int:
        return int(self.get(1).single_action_space.n)

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()


def _in_env_order(env_ids: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(env_ids)
    return [a[order] for a in arrays]


def play(env, seeds: np.ndarray, actor: Actor, max_steps: int, record: bool = False,
         serve_action: int | None = None) -> Episodes:
    """One episode per env from a reset seeded ``seeds[i]``; ``len(seeds)`` == env count.
    ``serve_action`` (FIRE) replaces the actor's action on an episode's first step and on the
    step after a lost life (the actor still sees every frame; ``actions`` are those played)."""
    n = len(seeds)
    obs, info = env.reset(seed=np.asarray(seeds, dtype=np.int64))
    obs, lives = _in_env_order(info["env_id"], obs, info["lives"])
    frames = obs[:, 0].transpose(0, 3, 1, 2)
    alive, scores = np.ones(n, dtype=bool), np.zeros(n)
    serve_due = np.ones(n, dtype=bool)
    lengths = np.zeros(n, dtype=np.int64)
    kept_frames, kept_actions = [], []
    for _ in range(max_steps):
        live = np.flatnonzero(alive)
        actions = np.zeros(n, dtype=np.int64)
        actions[live] = actor(np.ascontiguousarray(frames[live]), live)
        if serve_action is not None:
            actions[serve_due & alive] = serve_action
        if record and alive[0]:
            kept_frames.append(frames[0].copy())
            kept_actions.append(int(actions[0]))
        obs, reward, terminated, truncated, info = env.step(actions)
        obs, reward, ended, now = _in_env_order(info["env_id"], obs, reward,
                                                terminated | truncated, info["lives"])
        scores += np.where(alive, reward, 0.0)
        lengths += alive
        alive &= ~ended
        serve_due, lives = now < lives, now
        if not alive.any():
            break
        frames = obs[:, 0].transpose(0, 3, 1, 2)
    if not record:
        return Episodes(scores, lengths)
    return Episodes(scores, lengths, np.stack(kept_frames), np.array(kept_actions))


class AutoServe(gym.Wrapper):
    """One gymnasium env that serves for its agent, as ``play`` with a ``serve_action``: FIRE
    on the first step and after each lost life, whatever the agent chose."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.serve_action = fire_in(env.unwrapped.get_action_meanings())
        self._lives, self._serve_due = 0, self.serve_action is not None

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict]:
        obs, info = self.env.reset(**kwargs)
        self._lives, self._serve_due = info["lives"], self.serve_action is not None
        return obs, info

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._serve_due:
            action = self.serve_action
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._serve_due = info["lives"] < self._lives and self.serve_action is not None
        self._lives = info["lives"]
        return obs, reward, terminated, truncated, info


class LatentActor:
    """Encodes the playing envs' frames in one batch; env i follows ``controllers[owner[i]]``."""

    def __init__(self, vae: torch.nn.Module, controllers: list[LinearController],
                 owner: np.ndarray) -> None:
        self.vae, self.owner = vae, np.asarray(owner)
        self.features = controllers[0].features
        self.standardise = controllers[0].standardise  # every candidate shares it
        self.weight = np.stack([c.weight for c in controllers])  # (C, A, F)
        self.bias = np.stack([c.bias for c in controllers])  # (C, A)
        self.prev = np.zeros((len(owner), controllers[0].latent_dim), dtype=np.float32)
        self.started = np.zeros(len(owner), dtype=bool)

    def __call__(self, frames: np.ndarray, envs: np.ndarray) -> np.ndarray:
        mu = encode_frames(self.vae, frames)
        prev = np.where(self.started[envs, None], self.prev[envs], mu)  # delta 0 at the start
        feats = self.standardise(make_features(mu, prev, self.features))
        self.prev[envs], self.started[envs] = mu, True
        who = self.owner[envs]
        logits = np.einsum("nf,naf->na", feats, self.weight[who]) + self.bias[who]
        return logits.argmax(axis=1)


class RandomActor:
    """Uniformly random actions from a seeded generator: the random-policy baseline."""

    def __init__(self, n_actions: int, seed: int) -> None:
        self.n_actions = n_actions
        self.rng = np.random.default_rng([seed, 1])

    def __call__(self, frames: np.ndarray, envs: np.ndarray) -> np.ndarray:
        return self.rng.integers(self.n_actions, size=len(envs))


class FixedActor:
    """The same action every step: the open-loop baseline (Breakout's paddle parked at a wall
    still returns some serves)."""

    def __init__(self, action: int) -> None:
        self.action = action

    def __call__(self, frames: np.ndarray, envs: np.ndarray) -> np.ndarray:
        return np.full(len(envs), self.action, dtype=np.int64)


class FeatureRecorder(RandomActor):
    """Random actions, keeping the features an encoder's controller would see (calibration)."""

    def __init__(self, vae: torch.nn.Module, features: str, n_envs: int, n_actions: int,
                 seed: int) -> None:
        super().__init__(n_actions, seed)
        self.vae, self.features, self.kept = vae, features, []
        self.prev = np.zeros((n_envs, vae.latent_dim), dtype=np.float32)
        self.started = np.zeros(n_envs, dtype=bool)

    def __call__(self, frames: np.ndarray, envs: np.ndarray) -> np.ndarray:
        mu = encode_frames(self.vae, frames)
        prev = np.where(self.started[envs, None], self.prev[envs], mu)
        self.kept.append(make_features(mu, prev, self.features))
        self.prev[envs], self.started[envs] = mu, True
        return super().__call__(frames, envs)
