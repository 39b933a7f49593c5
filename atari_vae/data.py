"""Episode collection, the on-disk frame cache, and the train/validation split by episode."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from atari_vae.envs import FRAME_SHAPE, FRAMESKIP, STICKY_ACTION_PROB, Game, make_vector_env
from atari_vae.files import atomic_path, first_line

log = logging.getLogger(__name__)

# Bump when collection changes what frames a key yields, so stale caches are not reused.
COLLECTOR_VERSION = 3
# Env counts are a function of the episode count only (not the machine), so a seed yields the
# same frames everywhere: env i is seeded seed + i and draws actions from its own generator.
# Each env costs ~0.14 s of single-threaded start-up (ROM load and reset), so short
# collections use few; long ones use more, which the emulator threads step faster (measured).
FEW_ENVS, MANY_ENVS, MANY_FROM_EPISODES = 4, 8, 50


def collect_env_count(num_episodes: int) -> int:
    """How many emulators collect ``num_episodes`` episodes side by side."""
    return min(num_episodes, MANY_ENVS if num_episodes >= MANY_FROM_EPISODES else FEW_ENVS)


@dataclass
class FrameSet:
    """Frames with their provenance; every tensor has the same first dimension N."""

    frames_uint8: torch.Tensor  # (N, 3, 64, 64) uint8
    episode_ids: torch.Tensor  # (N,) int64, unique across games within one FrameSet
    steps: torch.Tensor  # (N,) int64, time step within the episode
    game_ids: torch.Tensor  # (N,) int64, index into ``games``
    games: tuple[str, ...]  # game titles

    def __len__(self) -> int:
        return len(self.frames_uint8)

    def subset(self, index: torch.Tensor) -> FrameSet:
        """Rows selected by a boolean mask or an index tensor."""
        return FrameSet(self.frames_uint8[index], self.episode_ids[index], self.steps[index],
                        self.game_ids[index], self.games)

    def for_game(self, title: str) -> FrameSet:
        """Only the frames of one game."""
        return self.subset(self.game_ids == self.games.index(title))

    @staticmethod
    def concat(parts: list[FrameSet]) -> FrameSet:
        """Join FrameSets of different games, keeping episode ids unique."""
        games = tuple(title for part in parts for title in part.games)
        offset, episode_ids, game_ids = 0, [], []
        for part in parts:
            episode_ids.append(part.episode_ids + offset)
            offset += int(part.episode_ids.max()) + 1 if len(part) else 0
            game_ids.append(part.game_ids + games.index(part.games[0]))
        return FrameSet(torch.cat([p.frames_uint8 for p in parts]), torch.cat(episode_ids),
                        torch.cat([p.steps for p in parts]), torch.cat(game_ids), games)


def collect_episodes(game: Game, num_episodes: int, max_steps: int, seed: int,
                     progress: bool = True, batch_size: int = 0) -> FrameSet:
    """Play ``num_episodes`` random-policy episodes and keep every observation as 64x64 RGB.

    Steps are asynchronous (half the envs at a time, so the emulator threads never wait for
    Python); ``batch_size`` overrides that and never changes the frames.
    """
    num_envs = collect_env_count(num_episodes)
    batch_size = min(batch_size or max(1, num_envs // 2), num_envs)
    env = make_vector_env(game, num_envs, max_steps, batch_size)
    book = _EpisodeBook(num_envs, num_episodes, max_steps)
    rngs = [np.random.default_rng([seed, i]) for i in range(num_envs)]
    # disable=None: a bar on a terminal, silence in logs (mlflow run, CI); the cache logs a line.
    bar = tqdm(total=num_episodes, desc=f"collect {game.title}", unit="ep",
               disable=None if progress else True)
    try:
        obs, info = env.reset(seed=seed)
        ended = np.zeros(len(obs), dtype=bool)
        while True:
            env_ids = info["env_id"]
            over = book.file(obs[:, 0], env_ids, ended)
            bar.update(max(0, over - bar.n))
            if over == num_episodes:
                break
            actions = np.array([rngs[i].integers(env.single_action_space.n) for i in env_ids])
            obs, _, terminated, truncated, info = env.step(actions)
            ended = terminated | truncated
    finally:
        bar.close()
        env.close()
    return book.frameset(game)


class _EpisodeBook:
    """Files observations from asynchronous envs and picks the episodes to keep.

    Episodes are ranked by the step of their env's own clock at which they start, ties by env:
    the order a lockstep run would start them in, whatever the thread timing. The first
    ``num_episodes`` are kept (taking the first to finish would favour short episodes).
    """

    def __init__(self, num_envs: int, num_episodes: int, max_steps: int) -> None:
        self.num_episodes, self.max_steps = num_episodes, max_steps
        self.clock = np.zeros(num_envs, dtype=np.int64)  # observations received per env
        self.step = np.zeros(num_envs, dtype=np.int64)  # step within the current episode
        self.episode = np.full(num_envs, -1)  # episodes started per env, minus one
        self.starts: list[tuple[int, int, int]] = []  # (start clock, env, env's episode)
        self.finished: set[tuple[int, int]] = set()  # (env, env's episode)
        self.chosen: list[tuple[int, int, int]] | None = None
        self.chunks: list[tuple[np.ndarray, ...]] = []
        self._new = np.ones(num_envs, dtype=bool)  # the next observation starts an episode

    def file(self, frames: np.ndarray, env_ids: np.ndarray, ended: np.ndarray) -> int:
        """Record one batch (frames NHWC uint8); returns how many chosen episodes are over.

        The count reaches ``num_episodes`` only once the choice is final and all have ended.
        """
        new = env_ids[self._new[env_ids]]
        self.episode[new] += 1
        self.step[new] = 0
        self.starts += zip(self.clock[new].tolist(), new.tolist(), self.episode[new].tolist())
        steps = self.step[env_ids]
        keep = steps < self.max_steps
        self.chunks.append((frames[keep], env_ids[keep], self.episode[env_ids][keep],
                            steps[keep]))
        self.clock[env_ids] += 1
        self.step[env_ids] += 1
        self._new[env_ids] = ended
        over = env_ids[ended]
        self.finished.update(zip(over.tolist(), self.episode[over].tolist()))
        if self.chosen is None and len(self.starts) >= self.num_episodes:
            # No env can still start an episode before its clock: the earlier ones are final.
            settled = sorted(s for s in self.starts if s[0] < self.clock.min())
            if len(settled) >= self.num_episodes:
                self.chosen = settled[:self.num_episodes]
        if self.chosen is None:
            return min(len(self.finished), self.num_episodes - 1)
        return sum((env, k) in self.finished for _, env, k in self.chosen)

    def frameset(self, game: Game) -> FrameSet:
        """The chosen episodes' frames, numbered by rank, sorted by episode and step, NCHW."""
        rank = np.full((len(self.clock), int(self.episode.max()) + 1), -1)
        for number, (_, env, k) in enumerate(self.chosen or []):
            rank[env, k] = number
        chunks = []
        for frames, env_ids, episodes, steps in self.chunks:
            ids = rank[env_ids, episodes]
            chunks.append((frames[ids >= 0], ids[ids >= 0], steps[ids >= 0]))
        return _to_frameset(chunks, game)


def _to_frameset(chunks: list[tuple[np.ndarray, ...]], game: Game) -> FrameSet:
    """Rows of (NHWC frames, episode, step) sorted by episode and step into one NCHW array.

    One fused scatter-transpose copy: torch's uint8 NHWC->NCHW ``contiguous()`` is ~10x slower.
    """
    episode_ids = np.concatenate([chunk[1] for chunk in chunks])
    steps = np.concatenate([chunk[2] for chunk in chunks])
    order = np.lexsort((steps, episode_ids))
    dest = np.empty_like(order)
    dest[order] = np.arange(len(order))
    frames = np.empty((len(order), *FRAME_SHAPE), dtype=np.uint8)
    start = 0
    for obs, _, _ in chunks:
        frames[dest[start:start + len(obs)]] = obs.transpose(0, 3, 1, 2)
        start += len(obs)
    steps_t = torch.from_numpy(steps[order])
    return FrameSet(torch.from_numpy(frames), torch.from_numpy(episode_ids[order]), steps_t,
                    torch.zeros_like(steps_t), (game.title,))


def cache_dir() -> Path:
    """Where collected frames are cached: $ATARI_VAE_CACHE_DIR, else ~/.cache/atari-vae."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "atari-vae"
    return Path(os.environ.get("ATARI_VAE_CACHE_DIR", default))


def cache_key(game: Game, num_episodes: int, max_steps: int, seed: int) -> str:
    """A digest of everything that determines the collected frames."""
    import ale_py

    spec = dict(game=game.rom_id, num_episodes=num_episodes, max_steps=max_steps, seed=seed,
                frameskip=FRAMESKIP, sticky=STICKY_ACTION_PROB, ale=ale_py.__version__,
                collector=COLLECTOR_VERSION)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return f"{game.rom_id}-{num_episodes}ep-{max_steps}steps-seed{seed}-{digest}"


def load_or_collect(game: Game, num_episodes: int, max_steps: int, seed: int,
                    progress: bool = True) -> FrameSet:
    """Frames from the cache when present, else collected and cached (atomically)."""
    path = cache_dir() / f"{cache_key(game, num_episodes, max_steps, seed)}.npz"
    if path.exists():
        try:
            frames = _read_cached(path, game)
            log.info("loaded %d cached frames from %s", len(frames), path)
            return frames
        except Exception as exc:  # empty, truncated or foreign: whatever it is, collect again
            log.warning("unreadable cache file %s (%s); collecting again", path, first_line(exc))
    frames = collect_episodes(game, num_episodes, max_steps, seed, progress)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, frames=frames.frames_uint8.numpy(),
                     episode_ids=frames.episode_ids.numpy(), steps=frames.steps.numpy())
        log.info("cached %d frames at %s", len(frames), path)
    except OSError as exc:  # a read-only or full cache must not cost the run
        log.warning("could not cache frames at %s: %s", path, exc)
    return frames


def _read_cached(path: Path, game: Game) -> FrameSet:
    """A cached FrameSet; raises if the file is not one (any error: the caller recollects)."""
    with np.load(path, allow_pickle=False) as npz:
        frames, episode_ids, steps = npz["frames"], npz["episode_ids"], npz["steps"]
    if (frames.dtype != np.uint8 or frames.shape[1:] != FRAME_SHAPE
            or not len(frames) == len(episode_ids) == len(steps) > 0):
        raise ValueError(f"not a frame cache: frames {frames.dtype} {frames.shape}, "
                         f"{len(episode_ids)} episode ids, {len(steps)} steps")
    return FrameSet(torch.from_numpy(frames), torch.from_numpy(episode_ids),
                    torch.from_numpy(steps), torch.zeros(len(steps), dtype=torch.int64),
                    (game.title,))


def load_games(games: list[Game], num_episodes: int, max_steps: int, seed: int,
               progress: bool = True) -> FrameSet:
    """Frames of every game, each game collected (or loaded) on its own."""
    return FrameSet.concat([load_or_collect(g, num_episodes, max_steps, seed, progress)
                            for g in games])


def split_by_episode(frames: FrameSet, val_split: float, seed: int) -> tuple[FrameSet, FrameSet]:
    """Hold out ``val_split`` of each game's episodes (at least one, never all) for validation."""
    generator = torch.Generator().manual_seed(seed)
    val_episodes = []
    for game_index in range(len(frames.games)):
        episodes = frames.episode_ids[frames.game_ids == game_index].unique()
        n_val = min(max(1, round(val_split * len(episodes))), len(episodes) - 1)
        order = torch.randperm(len(episodes), generator=generator)
        val_episodes.append(episodes[order[:n_val]])
    is_val = torch.isin(frames.episode_ids, torch.cat(val_episodes))
    return frames.subset(~is_val), frames.subset(is_val)


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
