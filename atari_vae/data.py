"""Frame sets: the store as a cache of collections, the train/validation split by episode,
game mixes and their balanced epoch order."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from atari_vae.collect import COLLECTOR_VERSION, play_episodes
from atari_vae.collect_policy import CollectPolicy
from atari_vae.envs import FRAME_SHAPE, FRAMESKIP, STICKY_ACTION_PROB, Game
from atari_vae.store import FrameRows, FrameStore, StoreError

log = logging.getLogger(__name__)


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
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``: tuning workers sharing a cache collect a key once."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process collecting %s", path.stem)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


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


def balanced_order(game_ids: torch.Tensor, generator: torch.Generator,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """One epoch's frame order: as many frames as ``game_ids`` holds, an equal share per game.

    Each game gives N // n_games frames (one game: a plain permutation; a larger game a fresh
    random subset each epoch, a smaller one repeated permutations), so an epoch costs the same
    whatever the mix; with ``weights`` (N,) each frame comes up in proportion to its weight.
    """
    counts = torch.bincount(game_ids)
    if len(counts) == 1 and weights is None:
        return torch.randperm(len(game_ids), generator=generator)
    share = epoch_length(game_ids) // len(counts)
    per_game = []
    for game_index, count in enumerate(counts.tolist()):
        members = (game_ids == game_index).nonzero().squeeze(1)
        if weights is not None:
            picks = _systematic(weights[members], share, generator)
        else:
            repeats = -(-share // count)
            picks = torch.cat([torch.randperm(count, generator=generator)
                               for _ in range(repeats)])
        per_game.append(members[picks[:share]])
    order = torch.cat(per_game)
    return order[torch.randperm(len(order), generator=generator)]


def _systematic(weights: torch.Tensor, draws: int, generator: torch.Generator) -> torch.Tensor:
    """``draws`` indices into ``weights``, each drawn the floor or ceiling of its expected number
    of times (systematic resampling): unlike draws with replacement, equal weights give each
    frame once."""
    shuffled = torch.randperm(len(weights), generator=generator)
    cumulative = torch.cumsum(weights[shuffled].double(), 0)
    points = (torch.rand(1, generator=generator, dtype=torch.float64)
              + torch.arange(draws, dtype=torch.float64)) / draws * cumulative[-1]
    # rounding can put the last point at the total itself, one past the last frame
    return shuffled[torch.searchsorted(cumulative, points, right=True).clamp(max=len(weights) - 1)]


def epoch_length(game_ids: torch.Tensor) -> int:
    """Frames in one epoch of ``balanced_order``."""
    n_games = max(1, len(torch.bincount(game_ids)))
    return len(game_ids) // n_games * n_games
