"""Frame store benchmark: collection time, disk and peak memory; training images/s from the
memory-mapped store against the same frames copied into RAM.

    python benchmarks/store_bench.py collect --games Breakout --episodes 20,200,1000
    python benchmarks/store_bench.py table --games Breakout --episodes 20,200,1000 --steps 200
    python benchmarks/store_bench.py train --games Breakout,Pong,SpaceInvaders --episodes 1000
    python benchmarks/store_bench.py ab --episodes 1000 --steps 10 --rounds 3
    python benchmarks/store_bench.py procs --games Pong --episodes 40 --procs 1,2,1,2

Frames go to $ATARI_VAE_CACHE_DIR (collected once, re-used). Every training figure comes from
its own subprocess, so each peak is that mode's own. Batch 128; --precision auto (bf16 where
the CPU has AVX512-BF16) unless set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MAX_STEPS, SEED, VAL_SPLIT, BATCH = 1000, 42, 0.1, 128


class PeakMemory:
    """Peak resident memory of this process: anonymous (sampled) and all (the kernel's VmHWM).

    File pages of a memory map count as resident once touched, but the kernel drops them at
    will, so the anonymous peak is what must fit in RAM.
    """

    def __init__(self, every_s: float = 0.05) -> None:
        self.anon_peak, self.every_s = 0, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def _sample(self) -> None:
        self.anon_peak = max(self.anon_peak, status_kib("RssAnon") * 1024)

    @staticmethod
    def total_peak() -> int:
        return status_kib("VmHWM") * 1024


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def gib(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 3)


def collect(games: list[str], episodes: int) -> dict:
    """Collect (or finish) each game's store; wall time, frames, disk and peak memory."""
    from atari_vae.data import cache_dir, cache_key, load_or_collect
    from atari_vae.envs import resolve_game

    result = {"episodes": episodes, "games": {}, "load": os.getloadavg()[0]}
    with PeakMemory() as peak:
        started = time.perf_counter()
        for name in games:
            game = resolve_game(name)
            began = time.perf_counter()
            frames = load_or_collect(game, episodes, MAX_STEPS, SEED, progress=False)
            seconds = time.perf_counter() - began
            path = cache_dir() / cache_key(game, episodes, MAX_STEPS, SEED)
            disk = sum(p.stat().st_size for p in path.iterdir())
            result["games"][game.title] = {"seconds": round(seconds, 1), "frames": len(frames),
                                           "frames_per_s": round(len(frames) / seconds),
                                           "disk_gib": gib(disk)}
            del frames
        result["seconds"] = round(time.perf_counter() - started, 1)
    result.update(anon_peak_gib=gib(peak.anon_peak), rss_peak_gib=gib(peak.total_peak()),
                  cpu_s=round(sum(os.times()[:4]), 1), load_after=os.getloadavg()[0])
    return result


def _fresh_model(cfg, refs):
    """The default VAE (seed 0) as training builds it, Adam, and a flat learning rate."""
    from atari_vae.train_step import build_model

    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_output_bias(refs.backgrounds[:1])
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def _train_pass(model, opt, sched, rows, game_ids, refs, cfg, dtype) -> None:
    """One pass of training's own steps (``train._train_epoch``) over ``rows`` on the CPU."""
    from atari_vae import train as training
    from atari_vae.train_step import backward_step

    training._train_epoch(backward_step(model, rows, game_ids, refs, cfg, dtype),
                          opt, sched, game_ids, cfg, torch.Generator().manual_seed(1),
                          torch.device("cpu"))


def train(games: list[str], episodes: int, mode: str, steps: int, precision: str) -> dict:
    """images/s of ``steps`` real training steps (train._train_epoch), batch 128."""
    from atari_vae.config import TrainConfig
    from atari_vae.data import epoch_length, load_games, split_by_episode
    from atari_vae.envs import resolve_game
    from atari_vae.metrics import game_references
    from atari_vae.runtime import resolve_precision
    from atari_vae.store import FrameRows

    cfg = TrainConfig(batch_size=BATCH, precision=precision)
    dtype = resolve_precision(precision, torch.device("cpu"))
    with PeakMemory() as peak:
        began = time.perf_counter()
        frames = load_games([resolve_game(g) for g in games], episodes, MAX_STEPS, SEED, False)
        train_set, val_set = split_by_episode(frames, VAL_SPLIT, SEED)
        if mode == "ram":  # the frames as the in-RAM cache held them: one tensor per split
            train_set, val_set = (s.subset(torch.arange(len(s))) for s in (train_set, val_set))
        refs = game_references(train_set.frames_uint8, train_set.game_ids, len(games))
        prep_s = time.perf_counter() - began
        # steps x batch rows drawn from the whole training set, read where they lie
        pick = torch.randint(len(train_set), (steps * BATCH,),
                             generator=torch.Generator().manual_seed(0))
        sample = FrameRows.of(train_set.frames_uint8, pick)
        model, opt, sched = _fresh_model(cfg, refs)

        def run(rows: FrameRows) -> float:
            started = time.perf_counter()
            _train_pass(model, opt, sched, rows, train_set.game_ids[pick[:len(rows)]], refs,
                        cfg, dtype)
            return time.perf_counter() - started

        run(FrameRows.of(sample, torch.arange(2 * BATCH)))  # warm-up
        seconds = run(sample)
    return {"games": games, "episodes": episodes, "mode": mode, "steps": steps,
            "train_frames": len(train_set), "val_frames": len(val_set),
            "epoch_images": epoch_length(train_set.game_ids), "precision": str(dtype)[6:],
            "images_per_s": round(steps * BATCH / seconds, 1), "prep_s": round(prep_s, 1),
            "anon_peak_gib": gib(peak.anon_peak), "rss_peak_gib": gib(peak.total_peak()),
            "threads": torch.get_num_threads(), "load": os.getloadavg()[0]}


def ab(games: list[str], episodes: int, steps: int, rounds: int, precision: str) -> dict:
    """Store against RAM in one process, alternately, at the same load: batch gather ms, and
    images/s of ``steps`` training steps per round (the same rows, from the store's map or from
    a copy of them in RAM)."""
    from atari_vae.config import TrainConfig
    from atari_vae.data import load_games, split_by_episode
    from atari_vae.envs import resolve_game
    from atari_vae.metrics import game_references
    from atari_vae.runtime import resolve_precision
    from atari_vae.store import FrameRows

    cfg = TrainConfig(batch_size=BATCH, precision=precision)
    dtype = resolve_precision(precision, torch.device("cpu"))
    frames = load_games([resolve_game(g) for g in games], episodes, MAX_STEPS, SEED, False)
    train_set, _ = split_by_episode(frames, VAL_SPLIT, SEED)
    pick = torch.randint(len(train_set), (steps * BATCH,),
                         generator=torch.Generator().manual_seed(0))
    sources = {"store": FrameRows.of(train_set.frames_uint8, pick),
               "ram": FrameRows.of(train_set.frames_uint8[pick])}
    game_ids = train_set.game_ids[pick]
    refs = game_references(sources["ram"][:], game_ids, len(games))
    model, opt, sched = _fresh_model(cfg, refs)
    result = {"episodes": episodes, "steps": steps, "precision": str(dtype)[6:],
              "gather_ms": {}, "images_per_s": {}, "load": os.getloadavg()[0]}
    for name, rows in sources.items():  # cold: the store's pages come from disk or page cache
        started = time.perf_counter()
        for index in torch.arange(len(pick)).reshape(steps, BATCH):
            rows[index]
        result["gather_ms"][name] = round(1000 * (time.perf_counter() - started) / steps, 2)
    copy = sources["ram"].sources[0]  # advanced indexing, as training indexed a tensor before
    started = time.perf_counter()
    for index in torch.arange(len(pick)).reshape(steps, BATCH):
        copy[index]
    result["gather_ms"]["ram, tensor[index]"] = round(
        1000 * (time.perf_counter() - started) / steps, 2)
    for _ in range(rounds):
        for name, rows in sources.items():
            started = time.perf_counter()
            _train_pass(model, opt, sched, rows, game_ids, refs, cfg, dtype)
            rate = steps * BATCH / (time.perf_counter() - started)
            result["images_per_s"].setdefault(name, []).append(round(rate, 1))
    result["load_after"] = os.getloadavg()[0]
    return result


def play(game_name: str, episodes: int, seed: int) -> dict:
    """Play ``episodes`` random-policy episodes as a collection does, keeping nothing."""
    from atari_vae.collect import play_episodes
    from atari_vae.envs import resolve_game

    lengths: list[int] = []
    started = time.perf_counter()
    play_episodes(resolve_game(game_name), episodes, MAX_STEPS, seed,
                  lambda _, frames: lengths.append(len(frames)), progress=False)
    return {"frames": sum(lengths), "seconds": time.perf_counter() - started}


def procs(game_name: str, episodes: int, counts: list[int]) -> list:
    """Emulator throughput of one collection against P processes sharing its episodes.

    Each of P processes plays episodes // P episodes (its own seed); frames/s is all their
    frames over the wall time from the first start to the last end, start-up included.
    """
    rows = []
    for count in counts:
        started, before = time.perf_counter(), os.times()
        children = [subprocess.Popen(
            [sys.executable, __file__, "play", "--games", game_name, "--episodes",
             str(episodes // count), "--seed", str(SEED + 1000 * k)],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            for k in range(count)]
        results = [json.loads(child.communicate()[0].strip().splitlines()[-1])
                   for child in children]
        wall = time.perf_counter() - started
        after = os.times()
        cpu = (after.children_user - before.children_user
               + after.children_system - before.children_system)
        frames = sum(r["frames"] for r in results)
        rows.append({"processes": count, "episodes": episodes, "frames": frames,
                     "wall_s": round(wall, 1), "frames_per_s": round(frames / wall),
                     "cpu_s": round(cpu, 1), "load": os.getloadavg()[0]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def table(games: list[str], episode_counts: list[int], steps: int, modes: list[str]) -> list:
    """``train`` for every episode count and mode, each in a fresh interpreter."""
    rows = []
    for episodes in episode_counts:
        for mode in modes:
            out = subprocess.run(
                [sys.executable, __file__, "train", "--games", ",".join(games), "--episodes",
                 str(episodes), "--mode", mode, "--steps", str(steps)],
                capture_output=True, text=True, check=True, env={**os.environ,
                                                                 "PYTHONPATH": str(ROOT)})
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["collect", "train", "table", "ab", "procs", "play"])
    parser.add_argument("--games", default="Breakout")
    parser.add_argument("--episodes", default="20")
    parser.add_argument("--mode", default="store", choices=["store", "ram"])
    parser.add_argument("--modes", default="store,ram")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--procs", default="1,2")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = parser.parse_args()
    games, counts = args.games.split(","), [int(n) for n in args.episodes.split(",")]
    if args.what == "collect":
        for episodes in counts:
            print(json.dumps(collect(games, episodes)), flush=True)
    elif args.what == "ab":
        print(json.dumps(ab(games, counts[0], args.steps, args.rounds, args.precision)),
              flush=True)
    elif args.what == "play":
        print(json.dumps(play(games[0], counts[0], args.seed)), flush=True)
    elif args.what == "procs":
        print(json.dumps(procs(games[0], counts[0], [int(n) for n in args.procs.split(",")])))
    elif args.what == "train":
        print(json.dumps(train(games, counts[0], args.mode, args.steps, args.precision)),
              flush=True)
    else:
        print(json.dumps(table(games, counts, args.steps, args.modes.split(","))), flush=True)


if __name__ == "__main__":
    main()
