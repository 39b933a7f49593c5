"""Where one training step of the default model (or --base_channels N) spends its time.

    .venv/bin/python benchmarks/profile_step.py --precision bf16 --threads 2

Runs the real step (``train_step.loss_terms``, backward, gradient clipping, fused Adam) on one
default-sized batch of cached Breakout frames under ``torch.profiler`` and prints the operators
by self CPU time, then the share of convolutions (forward and backward) against everything else:
the part that fusing the elementwise loss and optimizer work could win at most. Last, the
convolutions' own rate (their FLOPs over their self CPU time) against the matmul peak of the
precision: the share of the peak a step would reach if everything else were free. ``--by_shape``
splits the table by input shape (layer by layer); ``--compile`` also times the step, unprofiled,
eager against the loss under ``torch.compile``, in ``--rounds`` interleaved pairs.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch

# benchmarks/ is on sys.path when this runs as a script
from bench import PEAK_MATMUL_N, matmul_gflops
from torch.profiler import profile
from torch.utils.flop_counter import FlopCounterMode

from atari_vae import train, train_step
from atari_vae.config import TrainConfig
from atari_vae.data import load_or_collect
from atari_vae.envs import resolve_game, to_float
from atari_vae.metrics import game_references

CONV_OPS = ("convolution", "conv2d", "conv_transpose")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (after 3 warm-up)")
    parser.add_argument("--base_channels", type=int, default=TrainConfig().base_channels)
    parser.add_argument("--by_shape", action="store_true",
                        help="one table row per operator and input shape: layer by layer")
    parser.add_argument("--compile", action="store_true",
                        help="also time the step with the loss under torch.compile, unprofiled")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --compile: interleaved eager/compiled timings")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    cfg = TrainConfig(base_channels=args.base_channels)
    frames = load_or_collect(resolve_game("Breakout"), 20, 1000, 42, progress=False)
    x = to_float(frames.frames_uint8[:cfg.batch_size])
    refs = game_references(frames.frames_uint8, frames.game_ids, 1)
    cpu = torch.device("cpu")
    model = train._placed(train_step.build_model(cfg), cpu)  # as fit builds, lays out and steps it
    model.init_output_bias(refs.backgrounds)
    optimizer = train._optimizer(model, cfg, cpu)

    def loss() -> torch.Tensor:
        return train_step.loss_terms(model, x, refs.means, refs.backgrounds, cfg, dtype)[0].total

    def step(loss: Callable[[], torch.Tensor] = loss) -> None:
        total = loss()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_step.GRAD_CLIP_NORM)
        optimizer.step()

    for _ in range(3):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    conv_flops = sum(n for op, n in counter.get_flop_counts()["Global"].items()
                     if any(c in str(op) for c in CONV_OPS))
    started = time.perf_counter()
    with profile(record_shapes=args.by_shape) as prof:
        for _ in range(args.steps):
            step()
    seconds = (time.perf_counter() - started) / args.steps
    events = prof.key_averages()
    shaped = prof.key_averages(group_by_input_shape=True) if args.by_shape else events
    print(shaped.table(sort_by="self_cpu_time_total", row_limit=25 if args.by_shape else 15,
                       max_name_column_width=40, max_shapes_column_width=60))
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if any(c in e.key for c in CONV_OPS))
    print(f"{args.precision}, {args.threads} thread(s), batch {cfg.batch_size}: "
          f"{seconds * 1000:.0f} ms a step under the profiler ({cfg.batch_size / seconds:.0f} "
          f"images/s); convolutions {conv / total:.0%} of self CPU time, the rest "
          f"{1 - conv / total:.0%}")
    conv_rate = conv_flops / (conv / 1e6 / args.steps) / 1e9
    peak = matmul_gflops(dtype)
    print(f"convolutions: {conv_flops / 1e9:.2f} GFLOP a step in {conv / 1e3 / args.steps:.0f} ms "
          f"of their own: {conv_rate:.0f} GFLOP/s, {conv_rate / peak:.0%} of the "
          f"{args.precision} matmul peak ({peak:.0f} GFLOP/s, {PEAK_MATMUL_N}x{PEAK_MATMUL_N})")
    if args.compile:
        compare_compiled(step, loss, args.steps, cfg.batch_size, args.rounds)


def compare_compiled(step: Callable[..., None], loss: Callable[[], torch.Tensor], steps: int,
                     batch_size: int, rounds: int) -> None:
    """images/s of ``steps`` eager steps against the same with ``loss`` under torch.compile
    (inductor), unprofiled, in ``rounds`` interleaved pairs: a host whose speed drifts moves
    both sides alike. The compile's own seconds are printed apart."""
    def rate(run: Callable[[], None]) -> float:
        started = time.perf_counter()
        for _ in range(steps):
            run()
        return steps * batch_size / (time.perf_counter() - started)

    compiled = functools.partial(step, loss=torch.compile(loss))
    started = time.perf_counter()
    compiled()  # the compile
    compile_seconds = time.perf_counter() - started
    compiled()
    pairs = []
    for round_no in range(1, rounds + 1):
        pairs.append((rate(step), rate(compiled)))
        print(f"round {round_no}: eager {pairs[-1][0]:.0f} images/s, "
              f"compiled {pairs[-1][1]:.0f} images/s")
    eager_rates, compiled_rates = sorted(e for e, _ in pairs), sorted(c for _, c in pairs)
    ratio = statistics.median(c / e for e, c in pairs)
    print(f"unprofiled, {rounds} interleaved round(s) of {steps} steps: eager "
          f"{eager_rates[0]:.0f}-{eager_rates[-1]:.0f} images/s, loss under torch.compile "
          f"{compiled_rates[0]:.0f}-{compiled_rates[-1]:.0f} images/s (compiled in "
          f"{compile_seconds:.0f} s), median ratio {ratio:.2f}x")


if __name__ == "__main__":
    main()
