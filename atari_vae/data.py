"""Episode collection into the frame store, the train/validation split by episode, game mixes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from atari_vae.collect_policy import CollectPolicy
from atari_vae.envs import FRAME_SHAPE, FRAMESKIP, STICKY_ACTION_PROB, Game, make_vector_env
from atari_vae.store import FrameRows, FrameStore, StoreError

log = logging.getLogger(__name__)

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


@dataclass
class FrameSet:
    """Frames with their provenance; every tensor has the same first dimension N.

    ``frames_uint8`` is a tensor (often memory-mapped from the store) or, for a split or a
    multi-game mix, ``FrameRows``: indexing either gives a tensor of just those frames.
    """

    frames_uint8: torch.Tensor | FrameRows  # (N, 3, 64, 64) uint8
    episode_ids: torch.Tensor  # (N,) int64, unique across games within one FrameSet
    steps: torch.Tensor  # (N,) int64, time step within the episode
    game_ids: torch.Tensor  # (N,) int64, index into ``games``
    games: tuple[str, ...]  # game titles

    def __len__(self) -> int:
        return len(self.frames_uint8)

    def subset(self, index: torch.Tensor) -> FrameSet:
        """Rows selected by a boolean mask or an index tensor, copied into memory."""
        return self._select(self.frames_uint8[index], index)

    def view(self, index: torch.Tensor) -> FrameSet:
        """Rows selected by a mask or indices, read from the source only when indexed."""
        return self._select(FrameRows.of(self.frames_uint8, index), index)

    def _select(self, frames: torch.Tensor | FrameRows, index: torch.Tensor) -> FrameSet:
        return FrameSet(frames, self.episode_ids[index], self.steps[index], self.game_ids[index],
                        self.games)

    def for_game(self, title: str) -> FrameSet:
        """Only the frames of one game."""
        return self.subset(self.game_ids == self.games.index(title))

    @staticmethod
    def concat(parts: list[FrameSet]) -> FrameSet:
        """Join FrameSets of different games, keeping episode ids unique; frames stay put."""
        games = tuple(title for part in parts for title in part.games)
        offset, episode_ids, game_ids = 0, [], []
        for part in parts:
            episode_ids.append(part.episode_ids + offset)
            offset += int(part.episode_ids.max()) + 1 if len(part) else 0
            game_ids.append(part.game_ids + games.index(part.games[0]))
        return FrameSet(FrameRows.concat([p.frames_uint8 for p in parts]),
                        torch.cat(episode_ids), torch.cat([p.steps for p in parts]),
                        torch.cat(game_ids), games)


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


def collect_episodes(game: Game, num_episodes: int, max_steps: int, seed: int,
                     progress: bool = True, num_envs: int = 0) -> FrameSet:
    """Episodes 0..num_episodes-1 of a seed, in memory; ``num_envs`` never changes the frames."""
    by_number: dict[int, np.ndarray] = {}
    play_episodes(game, num_episodes, max_steps, seed, by_number.__setitem__,
                  progress=progress, num_envs=num_envs)
    parts = [by_number[number] for number in sorted(by_number)]
    lengths = torch.tensor([len(p) for p in parts], dtype=torch.int64)
    episode_ids = torch.repeat_interleave(torch.arange(len(parts)), lengths)
    starts = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    frames = (np.concatenate(parts) if parts
              else np.empty((0, *FRAME_SHAPE), dtype=np.uint8))
    return FrameSet(torch.from_numpy(frames), episode_ids,
                    torch.arange(len(episode_ids)) - starts,
                    torch.zeros(len(episode_ids), dtype=torch.int64), (game.title,))


def cache_dir() -> Path:
    """Where collected frames are stored: $ATARI_VAE_CACHE_DIR, else ~/.cache/atari-vae."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "atari-vae"
    return Path(os.environ.get("ATARI_VAE_CACHE_DIR", default))


def cache_key(game: Game, num_episodes: int, max_steps: int, seed: int,
              policy: CollectPolicy | None = None) -> str:
    """A digest of everything that determines the collected frames (a policy's name, pinned
    version, mix and epsilon too; random-policy keys are as before)."""
    import ale_py

    spec = dict(game=game.rom_id, num_episodes=num_episodes, max_steps=max_steps, seed=seed,
                frameskip=FRAMESKIP, sticky=STICKY_ACTION_PROB, ale=ale_py.__version__,
                collector=COLLECTOR_VERSION, **({"policy": policy.key} if policy else {}))
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    stem = _key_stem(game, num_episodes, max_steps, seed)
    return f"{stem}-{policy.stem}-{digest}" if policy else f"{stem}-{digest}"


def _key_stem(game: Game, num_episodes: int, max_steps: int, seed: int) -> str:
    return f"{game.rom_id}-{num_episodes}ep-{max_steps}steps-seed{seed}"


def load_or_collect(game: Game, num_episodes: int, max_steps: int, seed: int,
                    progress: bool = True, on_episode: Callable[[int], None] | None = None,
                    policy: CollectPolicy | None = None) -> FrameSet:
    """Frames from the store, collecting the episodes it lacks first (resuming a killed run).

    ``on_episode(number)`` is called after each newly collected episode is on disk.
    """
    key = cache_key(game, num_episodes, max_steps, seed, policy)
    path = cache_dir() / key
    try:
        with _locked(cache_dir() / f"{key}.lock"):
            store = _open_or_create(path, key, game, num_episodes, max_steps, seed)
            if not store.complete:
                _fill(store, game, num_episodes, max_steps, seed, progress, on_episode, policy)
    except OSError as exc:  # a read-only or full cache must not cost the run
        log.warning("could not store frames at %s (%s); collecting into a temporary store",
                    path, exc.strerror or exc)
        return _collect_to_temporary(game, num_episodes, max_steps, seed, progress, key, policy)
    log.info("%s: %d frames of %d episodes from %s", game.title, store.n_frames,
             num_episodes, path)
    return _frameset(store, game)


def _open_or_create(path: Path, key: str, game: Game, num_episodes: int, max_steps: int,
                    seed: int) -> FrameStore:
    """The store at ``path``; a fresh one where there is none or it is unreadable."""
    if path.exists():
        try:
            store = FrameStore.open(path, key)
            if not store.complete:
                log.info("%s: resuming the collection in %s, %d of %d episodes stored",
                         game.title, path, len(store.episode_lengths), num_episodes)
            return store
        except StoreError as exc:
            log.warning("ignoring unreadable frame store %s (%s); collecting again", path, exc)
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    old = sorted(path.parent.glob(f"{_key_stem(game, num_episodes, max_steps, seed)}-*.npz"))
    if old:
        log.warning("not using %s: .npz caches hold an older collector's episodes (other "
                    "frames), so they are collected again; delete it to free %.0f MB", old[0],
                    sum(p.stat().st_size for p in old) / 1e6)
    return FrameStore.create(path, key)


def _fill(store: FrameStore, game: Game, num_episodes: int, max_steps: int, seed: int,
          progress: bool, on_episode: Callable[[int], None] | None,
          policy: CollectPolicy | None = None) -> None:
    """Collect the episodes ``store`` lacks, appending each as it ends, then sort and close it."""
    def sink(number: int, frames: np.ndarray) -> None:
        store.append(number, frames)
        if on_episode:
            on_episode(number)

    play_episodes(game, num_episodes, max_steps, seed, sink,
                  frozenset(store.episode_numbers), progress, policy=policy)
    store.finish()


def _collect_to_temporary(game: Game, num_episodes: int, max_steps: int, seed: int,
                          progress: bool, key: str,
                          policy: CollectPolicy | None = None) -> FrameSet:
    """Collect into a store in the temp folder that is deleted once mapped (POSIX keeps it)."""
    folder = Path(tempfile.mkdtemp(prefix="atari-vae-frames-"))
    try:
        store = FrameStore.create(folder / key, key)
        _fill(store, game, num_episodes, max_steps, seed, progress, None, policy)
        return _frameset(store, game)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _frameset(store: FrameStore, game: Game) -> FrameSet:
    steps = store.steps()
    return FrameSet(store.frames(), store.episode_ids(), steps, torch.zeros_like(steps),
                    (game.title,))


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive lock on ``path``: tuning workers sharing a cache collect a key once."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; concurrent collections of one key are unsupported
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process collecting %s", path.stem)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def load_games(games: list[Game], num_episodes: int, max_steps: int, seed: int,
               progress: bool = True, policy: CollectPolicy | None = None) -> FrameSet:
    """Frames of every game, each from its own store (collected or resumed on its own)."""
    return FrameSet.concat([load_or_collect(g, num_episodes, max_steps, seed, progress,
                                            policy=policy) for g in games])


def split_by_episode(frames: FrameSet, val_split: float, seed: int) -> tuple[FrameSet, FrameSet]:
    """Hold out ``val_split`` of each game's episodes (at least one, never all) for validation.

    Both parts are views: their frames stay in the store until a batch is indexed.
    """
    generator = torch.Generator().manual_seed(seed)
    val_episodes = []
    for game_index in range(len(frames.games)):
        episodes = frames.episode_ids[frames.game_ids == game_index].unique()
        n_val = min(max(1, round(val_split * len(episodes))), len(episodes) - 1)
        order = torch.randperm(len(episodes), generator=generator)
        val_episodes.append(episodes[order[:n_val]])
    is_val = torch.isin(frames.episode_ids, torch.cat(val_episodes))
    return frames.view(~is_val), frames.view(is_val)


def balanced_order(game_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One epoch's frame order: a shuffle in which every game contributes equally many frames.

    With one game this is a plain permutation; with several, smaller games are cycled through
    repeated permutations up to the largest game's frame count.
    """
    counts = torch.bincount(game_ids)
    if len(counts) == 1:
        return torch.randperm(len(game_ids), generator=generator)
    per_game = []
    for game_index, count in enumerate(counts.tolist()):
        members = (game_ids == game_index).nonzero().squeeze(1)
        repeats = -(-int(counts.max()) // count)
        picks = torch.cat([torch.randperm(count, generator=generator) for _ in range(repeats)])
        picks = picks[: int(counts.max())]
        per_game.append(members[picks])
    order = torch.cat(per_game)
    return order[torch.randperm(len(order), generator=generator)]
