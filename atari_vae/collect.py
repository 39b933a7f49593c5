"""Playing the random-policy (or controller) episodes of a collection: seeded chains of
episodes on vectorised ALE, each episode handed over as it ends; the frames of a seed depend
on nothing else (not the env count, the finishing order, or where a resumed run starts)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from atari_vae.collect_policy import CollectPolicy
from atari_vae.envs import FRAME_SHAPE, Game, make_vector_env

# Bump when collection changes what frames a key yields, so stale stores are not reused.
# Version 4: episode r is played from a reset seeded seed + r with its own action stream, so it
# no longer depends on the other envs (version 3 ranked episodes across async envs).
COLLECTOR_VERSION = 4
# Env counts never change the frames (each episode is a function of the seed and its number).
# Each env costs ~0.14 s of single-threaded start-up (ROM load and reset), so short
# collections use few; long ones use more, which the emulator threads step faster (measured).
FEW_ENVS, MANY_ENVS, MANY_FROM_EPISODES = 4, 8, 50
MAX_CHAIN = 20  # episodes per seeded reset: an interrupted collection replays at most 19
# Called with (episode number, its frames (L, 3, 64, 64) uint8) as each episode ends.
EpisodeSink = Callable[[int, np.ndarray], None]


def collect_env_count(num_episodes: int) -> int:
    """How many emulators collect ``num_episodes`` episodes side by side."""
    return min(num_episodes, MANY_ENVS if num_episodes >= MANY_FROM_EPISODES else FEW_ENVS)


def chain_length(num_episodes: int) -> int:
    """Episodes played back to back from one seeded reset (a function of the count only).

    A seeded reset reloads the ROM (~0.14 s, longer than a Breakout episode), so episodes
    come in chains; ~2 chains per env keep all envs busy until near the end.
    """
    return max(1, min(MAX_CHAIN, num_episodes // (2 * collect_env_count(num_episodes))))


def play_episodes(game: Game, num_episodes: int, max_steps: int, seed: int, sink: EpisodeSink,
                  have: frozenset[int] = frozenset(), progress: bool = True,
                  num_envs: int = 0, policy: CollectPolicy | None = None) -> None:
    """Play the episodes of a seed not in ``have``; hand each to ``sink`` as it ends.

    Chain c (episodes cL..cL+L-1, L = ``chain_length``) starts from a reset seeded
    ``seed + c`` and acts from ``default_rng([seed, c])``: its frames depend on nothing
    else, not the env count, the finishing order, or where a resumed collection starts.
    A chain with some episodes in ``have`` is replayed, those episodes dropped. With
    ``policy``, the episodes it ``plays`` take its (epsilon-random) actions instead.
    """
    length = chain_length(num_episodes)
    chains = [c for c in range(-(-num_episodes // length))
              if any(r not in have for r in range(c * length, min((c + 1) * length,
                                                                  num_episodes)))]
    num_envs = min(num_envs or collect_env_count(num_episodes), len(chains))
    if not chains:
        return
    # Lockstep (batch = num_envs): only then can single envs be reset with a seed of our own.
    env = make_vector_env(game, num_envs, max_steps, num_envs)
    player = _Player(env, _Plan(num_episodes, length, have, max_steps, seed, policy), chains)
    bar = tqdm(total=num_episodes, initial=len(have), desc=f"collect {game.title}", unit="ep",
               disable=None if progress else True)
    try:
        env_ids = player.start()
        while player.to_go:
            obs, _, terminated, truncated, info = env.step(player.actions(env_ids))
            env_ids = player.record(obs, info["env_id"], terminated | truncated)
            for number, frames in player.finished():
                sink(number, frames)
                bar.update(1)
    finally:
        bar.close()
        env.close()


@dataclass(frozen=True)
class _Plan:
    num_episodes: int
    chain_length: int
    have: frozenset[int]  # episodes stored already: played (their chain replays) but dropped
    max_steps: int
    seed: int
    policy: CollectPolicy | None = None


class _Player:
    """Which chain and episode each env plays, its actions and frames, the finished episodes."""

    def __init__(self, env, plan: _Plan, chains: list[int]) -> None:
        self.env, self.plan, self.todo = env, plan, iter(chains)
        self.n_actions = int(env.single_action_space.n)
        n = env.num_envs
        self.chain = np.full(n, -1)  # chain per env, -1 once none is left
        self.episode = np.full(n, -1)  # episode number per env
        self.length = np.zeros(n, dtype=np.int64)  # frames kept so far
        self.rngs: list[np.random.Generator | None] = [None] * n
        self.actions_of = np.zeros((n, plan.max_steps), dtype=np.int64)
        # np.empty is paged in lazily: only the frames actually played take memory.
        self.frames = np.empty((n, plan.max_steps, *FRAME_SHAPE[1:], 3), dtype=np.uint8)
        self.done: list[tuple[int, np.ndarray]] = []
        self.to_go = plan.num_episodes - len(plan.have)
        self.by_policy = np.zeros((n, plan.max_steps), dtype=bool)  # the controller's steps
        self.prev_mu: list[np.ndarray | None] = [None] * n

    def start(self) -> np.ndarray:
        """Reset every env into its first chain; returns the env ids of the observations."""
        return self._next_chain(np.arange(len(self.chain)))

    def actions(self, env_ids: np.ndarray) -> np.ndarray:
        """Each env's next action, in the order of ``env_ids``."""
        step = np.clip(self.length[env_ids] - 1, 0, self.plan.max_steps - 1)
        actions = self.actions_of[env_ids, step]
        # not on an autoreset step (length 0: the env ignores the action), nor for idle envs
        mine = self.by_policy[env_ids, step] & (self.length[env_ids] > 0) & (
            self.chain[env_ids] >= 0)
        for i in np.flatnonzero(mine).tolist():
            env = int(env_ids[i])
            actions[i], self.prev_mu[env] = self.plan.policy.act(
                self.frames[env, self.length[env] - 1], self.prev_mu[env])
        return actions

    def record(self, obs: np.ndarray, env_ids: np.ndarray, ended: np.ndarray) -> np.ndarray:
        """File one step's observations; move envs whose episode ended on to the next one."""
        self._keep(obs, env_ids)
        over = np.sort(env_ids[ended & (self.chain[env_ids] >= 0)])
        chain_over = []
        for env in over.tolist():
            number = int(self.episode[env])
            if number not in self.plan.have:
                frames = self.frames[env, :self.length[env]].transpose(0, 3, 1, 2)
                self.done.append((number, np.ascontiguousarray(frames)))
            chain_end = (int(self.chain[env]) + 1) * self.plan.chain_length
            if number + 1 < min(chain_end, self.plan.num_episodes):
                self._begin(env, number + 1)  # the env resets itself on the next step
            else:
                chain_over.append(env)
        return self._next_chain(np.array(chain_over, dtype=np.int64)) if chain_over else env_ids

    def finished(self):
        """(number, frames) of the episodes that ended since the last call."""
        done, self.done = self.done, []
        self.to_go -= len(done)
        yield from done

    def _begin(self, env: int, number: int) -> None:
        self.episode[env], self.length[env] = number, 0
        self.actions_of[env] = self.rngs[env].integers(self.n_actions, size=self.plan.max_steps)
        policy, self.prev_mu[env] = self.plan.policy, None
        self.by_policy[env] = policy is not None and policy.plays(self.plan.seed, number)
        if self.by_policy[env, 0]:
            self.by_policy[env] &= ~policy.random_steps(self.plan.seed, number,
                                                        self.plan.max_steps)

    def _next_chain(self, envs: np.ndarray) -> np.ndarray:
        """Reset ``envs`` (sorted) with the seeds of the next chains; idle those left over."""
        for env in envs.tolist():
            chain = next(self.todo, -1)
            self.chain[env] = chain
            if chain >= 0:
                self.rngs[env] = np.random.default_rng([self.plan.seed, chain])
                self._begin(env, chain * self.plan.chain_length)
        fresh = envs[self.chain[envs] >= 0]
        if not len(fresh):  # nothing left to play: these envs idle on, their frames dropped
            return np.arange(len(self.chain))
        mask = np.zeros(len(self.chain), dtype=bool)
        mask[fresh] = True
        obs, info = self.env.reset(seed=(self.plan.seed + self.chain[fresh]).astype(np.int64),
                                   options={"reset_mask": mask} if not mask.all() else None)
        env_ids = info["env_id"]
        self._keep(obs[mask[env_ids]], env_ids[mask[env_ids]])
        return env_ids

    def _keep(self, obs: np.ndarray, env_ids: np.ndarray) -> None:
        """Append each observation (obs[:, 0], NHWC) to its env's episode, up to max_steps."""
        live = (self.chain[env_ids] >= 0) & (self.length[env_ids] < self.plan.max_steps)
        envs = env_ids[live]
        self.frames[envs, self.length[envs]] = obs[live, 0]
        self.length[envs] += 1
