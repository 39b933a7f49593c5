"""Time to quality: train one game under several recipes, score each on fresh episodes.

    python benchmarks/recipes.py --game Breakout --device cpu --precision fp32 \\
        "e100x18=--num_episodes 100 --epochs 18" "e300x6=--num_episodes 300 --epochs 6"

Each recipe is ``name=flags`` for ``atari-vae train`` (an empty flag string: the defaults).
A recipe's run is ``train`` (wall time, collection and MLflow included), then ``evaluate`` on
fresh episodes of seed 10000 (with the state probe) and of seed 20000 (pixels only). Recipes
run ``--parallel`` at a time (on a GPU machine; on 2 cores keep 1, the wall times are the
figure), each with its share of the CPU threads; none starts after ``--deadline`` seconds.
Prints a markdown table and writes ``<out>/results.json``. ``--seeds 42,43,44`` runs each
recipe once per collection seed and prints each recipe's game-score spread over them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from atari_vae.config import TrainConfig

EVAL_SEEDS = (10000, 20000)
BALL = ("ball_x", "ball_y")


def _run(cmd: list[str], log: Path, threads: int) -> float:
    """Run ``cmd`` with its output in ``log``; its wall seconds. Raises on a non-zero exit."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MLFLOW_DISABLE_TELEMETRY": "true"}
    started = time.perf_counter()
    with log.open("w") as fh:
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} exited {done.returncode}; see {log}")
    return time.perf_counter() - started


def run_recipe(name: str, flags: str, args: argparse.Namespace, threads: int) -> dict:
    """Train and evaluate one recipe; its figures (or its error)."""
    out = Path(args.out) / name
    out.mkdir(parents=True, exist_ok=True)
    vae = [sys.executable, "-m", "atari_vae"]
    common = ["--device", args.device, "--experiment_name", "atari-vae-recipes"]
    result: dict = {"recipe": name, "flags": flags}
    try:
        result["train_s"] = _run(
            [*vae, "train", "--env_name", args.game, *shlex.split(flags), *common,
             "--precision", args.precision, "--output_dir", str(out / "train"),
             "--checkpoint_freq", "1000"], out / "train.log", threads)
        log = (out / "train.log").read_text()
        epochs = re.findall(r"epoch (\d+)/\d+ .* ([\d.]+)s$", log, re.M)
        result["epochs"] = len(epochs)
        result["epoch_s"] = sum(float(s) for _, s in epochs)
        result["train_frames"] = int(re.search(r"(\d+) train / \d+ val frames", log).group(1))
        for seed in EVAL_SEEDS:
            probe = [] if seed == EVAL_SEEDS[0] else ["--probe_frames", "0"]
            _run([*vae, "evaluate", "--model_path", str(out / "train" / "best_model.pt"),
                  "--env_name", args.game, "--seed", str(seed), *common,
                  *shlex.split(args.eval_flags), *probe,  # last: seed 20000 never probes
                  "--output_dir", str(out / f"eval-{seed}")], out / f"eval-{seed}.log", threads)
            result[seed] = _figures(out / f"eval-{seed}")
    except (RuntimeError, AttributeError, OSError) as exc:
        result["error"] = str(exc)
    return result


def _figures(folder: Path) -> dict:
    """The held-out pixel figures and, where present, the probe's of one evaluate folder."""
    scores = next(iter(json.loads((folder / "metrics.json").read_text())["games"].values()))
    keys = ("psnr", "baseline_psnr", "fg_accuracy", "baseline_fg_accuracy", "object_recall")
    figures = {k: scores[k] for k in keys if k in scores}
    probe_file = folder / "state_probe.json"
    if probe_file.exists():
        probe = next(iter(json.loads(probe_file.read_text()).values()))
        f1, r2 = probe["f1"].get("model", {}), probe["r2"].get("model", {})
        on_screen = probe.get("r2_on_screen", {}).get("model", {})
        figures |= {"probe_score": probe["score"]["model"],
                    "probe_random_init": probe["score"]["random_init"],
                    **{f"{k}_f1": f1[k] for k in BALL if k in f1},
                    **{f"{k}_r2": r2[k] for k in BALL if k in r2},
                    **{f"{k}_r2_on_screen": on_screen[k] for k in BALL if k in on_screen}}
    return figures


def table(results: list[dict]) -> str:
    """One markdown row per recipe."""
    rows = ["| recipe | train s | epochs | steps (est.) | fg acc s10000 / s20000 | "
            "PSNR over base s10000 / s20000 | object recall | probe (random init) | ball F1 x/y | "
            "ball R² x/y, all frames (one object on screen) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['recipe']} | error: {r['error']} |")
            continue
        a, b = r[EVAL_SEEDS[0]], r[EVAL_SEEDS[1]]
        batch = _flag(r["flags"], "--batch_size", TrainConfig().batch_size)
        steps = r["epochs"] * -(-r["train_frames"] // batch)
        rows.append(
            f"| {r['recipe']} | {r['train_s']:.0f} | {r['epochs']} | {steps} | "
            f"{a['fg_accuracy']:.3f} / {b['fg_accuracy']:.3f} | "
            f"{a['psnr'] - a['baseline_psnr']:+.2f} / {b['psnr'] - b['baseline_psnr']:+.2f} | "
            f"{_figure(a, 'object_recall', '.3f')} | "
            f"{_figure(a, 'probe_score', '.3f')} ({_figure(a, 'probe_random_init', '.3f')}) | "
            f"{_figure(a, 'ball_x_f1', '.2f')} / {_figure(a, 'ball_y_f1', '.2f')} | "
            f"{_figure(a, 'ball_x_r2', '.2f')} / {_figure(a, 'ball_y_r2', '.2f')} "
            f"({_figure(a, 'ball_x_r2_on_screen', '.2f')} / "
            f"{_figure(a, 'ball_y_r2_on_screen', '.2f')}) |")
    return "\n".join(rows)


def _figure(figures: dict, key: str, spec: str) -> str:
    """``figures[key]`` formatted, or "-" where the run has no such figure (a game without a
    ball, an evaluation without the probe)."""
    value = figures.get(key)
    return "-" if value is None or np.isnan(value) else format(value, spec)


def with_seeds(recipes: list[tuple[str, str]], seeds: list[int]) -> list[tuple[str, str]]:
    """Each recipe once per collection seed, as ``<name>_s<seed>`` with ``--seed <seed>``."""
    return [(f"{name}_s{seed}", f"{flags} --seed {seed}".strip())
            for name, flags in recipes for seed in seeds] if seeds else recipes


def spread(results: list[dict], recipes: list[tuple[str, str]], seeds: list[int]) -> str:
    """Per recipe, its game score and fg accuracy (seed 10000's episodes) over the seeds: one
    modest-budget run moves by a few hundredths with the seed, so compare these instead."""
    lines = []
    for name, _ in recipes:
        runs = [r[EVAL_SEEDS[0]] for r in results
                if r["recipe"] in {f"{name}_s{seed}" for seed in seeds} and "error" not in r]
        scores = np.array([run.get("probe_score", np.nan) for run in runs])
        fg = np.array([run["fg_accuracy"] for run in runs])
        if len(runs):
            lines.append(f"{name} over {len(runs)} of seeds {' '.join(map(str, seeds))}: game "
                         f"score min {scores.min():.3f}, median {np.median(scores):.3f}, max "
                         f"{scores.max():.3f}, mean {scores.mean():.3f}; fg accuracy mean "
                         f"{fg.mean():.3f}")
    return "\n".join(lines)


def _seed_list(text: str) -> list[int]:
    """``"42,43,44"`` -> [42, 43, 44] (comma-separated, so the recipes after it stay recipes)."""
    try:
        return [int(seed) for seed in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"want comma-separated integers such as 42,43,44, got {text!r}") from None


def _flag(flags: str, name: str, default: int) -> int:
    parts = shlex.split(flags)
    return int(parts[parts.index(name) + 1]) if name in parts else default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+", help="name=flags for atari-vae train")
    parser.add_argument("--game", default="Breakout")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--deadline", type=float, default=float("inf"),
                        help="start no recipe after this many seconds")
    parser.add_argument("--eval_flags", default="", help="extra flags for atari-vae evaluate")
    parser.add_argument("--out", default="outputs/recipes")
    parser.add_argument("--seeds", type=_seed_list, default=[],
                        help="comma-separated collection seeds (42,43,44): run each recipe once "
                             "per seed (--seed) and print the spread of its game score")
    args = parser.parse_args()
    recipes = [r.partition("=")[::2] for r in args.recipes]
    if args.seeds and any("--seed" in shlex.split(flags) for _, flags in recipes):
        parser.error("--seeds sets each run's --seed; leave --seed out of the recipes")
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    started = time.perf_counter()

    def one(recipe: tuple[str, str]) -> dict:
        if time.perf_counter() - started > args.deadline:
            return {"recipe": recipe[0], "flags": recipe[1], "error": "not started (deadline)"}
        result = run_recipe(*recipe, args, threads)
        print(table([result]).splitlines()[-1], flush=True)
        return result

    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(one, with_seeds(recipes, args.seeds)))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))
    print(f"{args.game} on {args.device}, precision {args.precision}, {args.parallel} at a time")
    print(table(results))
    if args.seeds:
        print(spread(results, recipes, args.seeds))


if __name__ == "__main__":
    main()
