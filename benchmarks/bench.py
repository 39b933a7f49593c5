"""atari-vae speed benchmark: every figure of issue 7 in one process tree, printed as a table.

    .venv/bin/python benchmarks/bench.py                 # everything, ~8 min on 2 quiet cores
    .venv/bin/python benchmarks/bench.py --only collect,train --json out.json

Sections: machine, peak (matmul GFLOP/s), train (images/s and share of peak), collect (frames/s),
planner (encode latency), quick (the quick test through `atari-vae train`), samejob (`atari-vae
train` vs benchmarks/plain_baseline.py, and bf16 vs fp32 quality), tune (a 20-trial study).
Wall-clock figures depend on what else runs: the table shows the load average beside each one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import bench_jobs  # benchmarks/ is on sys.path when this runs as a script
import numpy as np
import torch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
PEAK_MATMUL_N = 2048  # side of the roofline matmul (profile_step.py prints it too)


# what benchmarks/as_avx2.sh sets: oneDNN (convolutions, bf16), MKL (fp32 matmuls), ATen kernels
ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


def precisions() -> dict[str, torch.dtype]:
    """The precisions worth timing here: bf16 only where the CPU has bf16 instructions that
    oneDNN may use (not on AVX2 CPUs, nor under `benchmarks/as_avx2.sh`: there its fallback
    runs ~1000x slower than fp32)."""
    from atari_vae.runtime import cpu_has_fast_bf16

    return PRECISIONS if cpu_has_fast_bf16() else {"fp32": torch.float32}


@dataclass
class Context:
    """What the sections share: where jobs write, the thread count, the measured matmul peaks
    (by precision and threads), the cached frames, and the table's rows."""

    workdir: Path
    threads: int
    peaks: dict[tuple[str, int], float] = field(default_factory=dict)
    frames: tuple | None = None
    rows: list[dict] = field(default_factory=list)

    def row(self, section: str, figure: str, value: float | str, unit: str = "",
            note: str = "") -> None:
        """Record one figure (with the 1-minute load average at the time) and echo it."""
        load = os.getloadavg()[0]
        self.rows.append({"section": section, "figure": figure, "value": value, "unit": unit,
                          "note": note, "load": round(load, 1)})
        shown = f"{value:,.4g}" if isinstance(value, float) else str(value)
        print(f"[{section}] {figure}: {shown} {unit}  {note}  (load {load:.1f})",
              file=sys.stderr, flush=True)


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def thread_counts() -> list[int]:
    return sorted({1, torch.get_num_threads()})


# ---------------------------------------------------------------- machine and matmul peak
def bench_machine(ctx: Context) -> None:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    from atari_vae.runtime import cpu_has_fast_bf16

    ctx.row("machine", "cpu", model, note=f"{os.cpu_count()} logical cores, "
        f"{len(os.sched_getaffinity(0))} usable, avx512_bf16/amx={cpu_has_fast_bf16()}")
    ctx.row("machine", "torch", torch.__version__,
            note=f"{torch.get_num_threads()} intra-op threads")
    caps = {name: os.environ[name] for name in ISA_ENV if name in os.environ}
    ctx.row("machine", "instruction sets used", torch.backends.cpu.get_cpu_capability(),
        note=", ".join(f"{k}={v}" for k, v in caps.items()) or "not capped")
    cpu_max = Path("/sys/fs/cgroup/cpu.max")
    if cpu_max.exists():
        ctx.row("machine", "cgroup cpu.max", cpu_max.read_text().strip())


def matmul_gflops(dtype: torch.dtype, n: int = PEAK_MATMUL_N) -> float:
    """GFLOP/s of n x n matmuls in ``dtype`` (best of three medians of three): the roofline."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    seconds = min(median_time(lambda: torch.mm(a, b), 3, 1) for _ in range(3))
    return 2 * n**3 / seconds / 1e9


def bench_peak(ctx: Context) -> None:
    """Big square matmuls: the roofline the training figures are measured against."""
    for threads in thread_counts():
        torch.set_num_threads(threads)
        for name, dtype in precisions().items():
            gflops = matmul_gflops(dtype)
            ctx.peaks[name, threads] = gflops
            ctx.row("peak", f"matmul {name}, {threads} thread(s)", gflops, "GFLOP/s")
    torch.set_num_threads(ctx.threads)


# ---------------------------------------------------------------- training throughput
def bench_frames(ctx: Context):
    """20 cached Breakout episodes (the bench's own cache), split by episode."""
    from atari_vae.data import load_or_collect, split_by_episode
    from atari_vae.envs import resolve_game

    if ctx.frames is None:
        frames = load_or_collect(resolve_game("Breakout"), 20, 1000, 42, progress=False)
        ctx.frames = split_by_episode(frames, 0.1, 42)
    return ctx.frames


def flops_per_image(cfg, batch: int = 32) -> float:
    """Forward + backward FLOPs of one image (convs and matmuls, as FlopCounterMode counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    from atari_vae import train_step

    model = train_step.build_model(cfg)  # the VAE ``cfg`` trains, its heads included
    x = torch.rand(batch, 3, 64, 64)
    with FlopCounterMode(display=False) as counter:
        x_hat, mu, logvar = model(x)
        heads = [head(mu).sum() for head in (model.locator, model.mask, model.coords)
                 if head is not None]
        (x_hat.sum() + mu.sum() + logvar.sum() + sum(heads)).backward()
    return counter.get_total_flops() / batch


def bench_train(ctx: Context) -> None:
    """images/s of the real training step (train._train_epoch) per width, threads, precision
    and layout, at the default batch size."""
    from atari_vae.config import TrainConfig
    from atari_vae.model import LEGACY_ARCHITECTURE

    train_set, _ = bench_frames(ctx)
    classic = LEGACY_ARCHITECTURE["base_channels"]
    for width in dict.fromkeys((TrainConfig().base_channels, classic)):
        _bench_train_width(ctx, train_set, TrainConfig(base_channels=width))
    torch.set_num_threads(ctx.threads)


def _bench_train_width(ctx: Context, train_set, cfg) -> None:
    from atari_vae import train, train_step
    from atari_vae.metrics import game_references

    flops = flops_per_image(cfg)
    width = f"--base_channels {cfg.base_channels}, batch {cfg.batch_size}"
    ctx.row("train", f"model FLOPs/image fwd+bwd, {width}", flops / 1e9, "GFLOP")
    subset = train_set.subset(torch.arange(min(len(train_set), 8 * cfg.batch_size)))
    warm = train_set.subset(torch.arange(2 * cfg.batch_size))
    refs = game_references(subset.frames_uint8, subset.game_ids, 1)
    for threads in thread_counts():
        torch.set_num_threads(threads)
        for name, dtype in precisions().items():
            for layout in ("contiguous", "channels_last"):
                torch.manual_seed(0)
                model = train_step.build_model(cfg)  # the VAE cfg trains, its heads included
                model.init_output_bias(refs.backgrounds)
                if layout == "channels_last":
                    model = model.to(memory_format=torch.channels_last)
                opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=True)  # as fit's
                sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
                gen = torch.Generator().manual_seed(0)

                def epoch(data=subset, model=model, opt=opt, sched=sched, gen=gen, dtype=dtype):
                    model.train()
                    backward = train_step.backward_step(model, data.frames_uint8, data.game_ids,
                                                    refs, cfg, dtype)
                    train._train_epoch(backward, opt, sched, data.game_ids, cfg, gen,
                                       torch.device("cpu"))

                epoch(warm)
                seconds = min(median_time(epoch, 1, 0) for _ in range(2))
                rate = len(subset) / seconds
                peak = ctx.peaks.get((name, threads))
                share = f"{rate * flops / 1e9 / peak:.0%} of {name} matmul peak" if peak else ""
                ctx.row("train", f"{name} {layout}, {threads} thread(s), {width}", rate,
                    "images/s", share)


# ---------------------------------------------------------------- collection
def emulator_rate(game, envs: int, batch: int, **overrides) -> float:
    """Steady-state frames/s of ale-py's vector env alone: random actions, no Python filing."""
    from atari_vae.envs import make_vector_env

    env = make_vector_env(game, envs, 1000, batch, **overrides)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    size = batch or envs
    for _ in range(200 // size):  # past the resets
        env.step(rng.integers(0, env.single_action_space.n, size=size))
    steps = 6000 // size
    started = time.perf_counter()
    for _ in range(steps):
        env.step(rng.integers(0, env.single_action_space.n, size=size))
    rate = steps * size / (time.perf_counter() - started)
    env.close()
    return rate


def bench_collect(ctx: Context) -> None:
    """frames/s of data.collect_episodes (no cache) beside the bare emulator's steady rate."""
    from atari_vae import collect, data
    from atari_vae.envs import resolve_game

    game = resolve_game("Breakout")
    for envs in (collect.FEW_ENVS, collect.MANY_ENVS):
        # Lockstep (batch = envs), as collect.py steps them since the seeded-chain collector.
        ctx.row("collect", f"emulator alone, {envs} envs, lockstep as collected",
            emulator_rate(game, envs, envs), "frames/s",
            "64x64 RGB resized in ALE's C++ threads; steady state, random actions")
    # Where the time goes: the same emulator without the resize, and with the cheaper
    # grayscale one (ale-py's default observation, 84x84 grey).
    ctx.row("collect", "emulator alone, 4 envs, raw 210x160 RGB (no resize)",
        emulator_rate(game, 4, 4, img_height=210, img_width=160), "frames/s")
    ctx.row("collect", "emulator alone, 4 envs, 84x84 grayscale",
        emulator_rate(game, 4, 4, img_height=84, img_width=84, grayscale=True), "frames/s")
    for episodes in (100, 20):
        started = time.perf_counter()
        frames = data.collect_episodes(game, episodes, 1000, 42, progress=False)
        rate = len(frames) / (time.perf_counter() - started)
        ctx.row("collect", f"collect_episodes, {episodes} Breakout episodes", rate, "frames/s",
            f"{len(frames)} frames, {collect.collect_env_count(episodes)} envs, incl. start-up; "
            f"target >= 4000")


# ---------------------------------------------------------------- planner latency
def bench_planner(ctx: Context) -> None:
    """preprocess + encode of raw (210, 160, 3) observations, median wall time."""
    from atari_vae import VAE, preprocess

    model = VAE().eval()
    rng = np.random.default_rng(0)
    for threads in thread_counts():
        torch.set_num_threads(threads)
        for batch, repeats in ((1, 200), (256, 20)):
            raw = rng.integers(0, 256, size=(batch, 210, 160, 3), dtype=np.uint8)
            obs = raw[0] if batch == 1 else raw

            def encode(obs=obs):
                with torch.inference_mode():
                    return model.encode(preprocess(obs))[0]

            seconds = median_time(encode, repeats, 3)
            ctx.row("planner", f"preprocess + encode, batch {batch}, {threads} thread(s)",
                seconds * 1e3, "ms", f"median of {repeats}; {batch / seconds:,.0f} obs/s")
    torch.set_num_threads(ctx.threads)


# ---------------------------------------------------------------- driver
SECTIONS: dict[str, Callable[[Context], None]] = {  # in the order they run
    "machine": bench_machine, "peak": bench_peak, "train": bench_train,
    "collect": bench_collect, "planner": bench_planner, "quick": bench_jobs.bench_quick,
    "samejob": bench_jobs.bench_samejob, "tune": bench_jobs.bench_tune,
}


def print_table(rows: list[dict]) -> None:
    print(f"\n{'section':<8} {'figure':<64} {'value':>12} {'unit':<9} {'load':>4}  note")
    for r in rows:
        value = f"{r['value']:,.4g}" if isinstance(r["value"], float) else str(r["value"])
        print(f"{r['section']:<8} {r['figure'][:64]:<64} {value:>12} {r['unit']:<9} "
              f"{r['load']:>4}  {r['note']}")


def main() -> None:
    parser = argparse.ArgumentParser(description="atari-vae speed benchmark (issue 7).")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--skip", default="", help="comma-separated sections to leave out")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--workdir", type=Path, help="keep job outputs here (default: temp)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads here and OMP_NUM_THREADS in jobs (default: torch's)")
    args = parser.parse_args()
    chosen = [s for s in args.only.split(",") if s and s not in args.skip.split(",")]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; allowed: {', '.join(SECTIONS)}")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if args.threads:  # jobs read OMP_NUM_THREADS; this process is set directly
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="atari-vae-bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        os.environ["ATARI_VAE_CACHE_DIR"] = str(work / "cache-bench")
        ctx = Context(work.resolve(), torch.get_num_threads())
        started = time.perf_counter()
        for section, bench_section in SECTIONS.items():
            if section in chosen:
                bench_section(ctx)
        ctx.row("total", "benchmark wall", time.perf_counter() - started, "s")
    print_table(ctx.rows)
    if args.json:
        args.json.write_text(json.dumps(ctx.rows, indent=2))


if __name__ == "__main__":
    main()
