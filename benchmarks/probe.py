"""State-probe figures of issue 13: what survives preprocessing, and a table of probe results.

    python benchmarks/probe.py survival --game Breakout --frames 20000
    python benchmarks/probe.py baselines --game Pong --frames 20000
    python benchmarks/probe.py baselines --game Breakout --pixels
    python benchmarks/probe.py budget --game Breakout --model outputs/run/best_model.pt
    python benchmarks/probe.py codes --game Breakout
    python benchmarks/probe.py rules --game SpaceInvaders
    python benchmarks/probe.py table outputs/probe/*/eval

``survival``: labelled fresh frames (evaluate's probe seed), scored for how often the ball (or
shot) shows as a small foreground object at 64x64 (the object metric's definition, against the
median background of the frames) and how well its RAM coordinates follow that object's
centroid (R^2 of a line fitted on the frames with exactly one small object).
``baselines``: the probe's random-init encoder (32 latents) and majority class, no model needed;
``--pixels`` adds the same probe on the 64x64 RGB pixels themselves (12,288 features): what a
line can read from the frames a model sees, before any encoder.
``budget``: a trained model's probe (and its random-init encoder's) twice on evaluate's
frames and split, once with the protocol's optimiser budget and once trained longer at a
higher rate: how much of an F1 is the code and how much the probe's budget (a byte on a
smooth line in z needs large weights).
``codes``: the ball's probe on codes made from the pixels' own ball (the small object's
intensity-weighted centroid, when exactly one is in view) in three forms a code could take: a
line (row, col), one-hot pixels, Fourier features. What a code of the visible ball can score,
and which form a linear byte classifier reads.
``rules``: where the loss's small-object rule (``losses.small_objects``) finds small pixels in
the training frames, with its region (the usually empty pixels, or everywhere) and crowding
reach varied: which rows a ball-finding term would look at under each rule.
``table``: one markdown row per evaluate output folder with a ``state_probe.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from atari_vae.config import EvaluateConfig, TrainConfig
from atari_vae.envs import Game, resolve_game, to_float
from atari_vae.evaluate import PROBE_SEED_OFFSET
from atari_vae.losses import CROWD_REACH_PX, fourier_code, small_objects, usually_empty
from atari_vae.metrics import SMALL_OBJECT_MAX_PIXELS, reference_frames, small_object_labels
from atari_vae.model import FOURIER_PERIODS_PX, VAE, random_init_like
from atari_vae.probe import (
    ProbeFrames,
    ProbeSettings,
    encoder_means,
    format_probe_table,
    linear_r2,
    probe_frames,
    probe_sources,
)
from atari_vae.registry import load_state_file
from atari_vae.state_labels import load_or_collect_labelled, variables

BALLS = {"breakout": ("ball_x", "ball_y"), "pong": ("ball_x", "ball_y"),
         "space_invaders": ("missiles_y",)}


def _small_object_centroids(frames_uint8: torch.Tensor, mean_frame: torch.Tensor | None,
                            background: torch.Tensor,
                            by_intensity: bool = False) -> list[list[tuple[float, float]]]:
    """Per frame: the (row, col) centroids of its small moving objects (the object metric's);
    ``by_intensity`` weighs each pixel by its distance from the background (the Fourier
    head's centroid), else every pixel alike; ``mean_frame`` None: also where the mean frame is
    not background (no "moving" rule)."""
    from scipy import ndimage

    out = []
    for start in range(0, len(frames_uint8), 512):
        target = to_float(frames_uint8[start:start + 512])
        labels, is_object = small_object_labels(target, background, mean_frame)
        weights = ((target - background).abs().amax(1).numpy() if by_intensity
                   else labels > 0)
        for frame_labels, weight in zip(labels, weights, strict=True):
            present = [k for k in np.unique(frame_labels) if is_object[k]]
            out.append(ndimage.center_of_mass(weight, frame_labels, present) if present else [])
    return out


def _in_sample_r2(features: list[np.ndarray], ram: np.ndarray) -> float:
    """R^2 of a least-squares line (with intercept) from ``features`` to ``ram``, on the same
    frames it was fitted on (the probe's ``linear_r2``)."""
    x = torch.from_numpy(np.stack(features, axis=1).astype(np.float64))
    y = torch.from_numpy(ram.astype(np.float64)).unsqueeze(1)
    return float(linear_r2(x, y, x, y)[0])


def _evaluates_probe_episodes() -> tuple[int, int]:
    """(max_steps, seed) of the probe's labelled episodes at ``atari-vae evaluate``'s defaults."""
    defaults = EvaluateConfig()
    return defaults.max_steps, defaults.seed + PROBE_SEED_OFFSET


def survival(args: argparse.Namespace) -> None:
    game = resolve_game(args.game)
    max_steps, seed = _evaluates_probe_episodes()
    labelled = load_or_collect_labelled(game, args.frames, max_steps, seed)
    centroids = _small_object_centroids(labelled.frames_uint8,
                                        *reference_frames(labelled.frames_uint8))
    counts = np.array([len(c) for c in centroids])
    print(f"{game.title}: {len(counts)} frames; small objects (<= {SMALL_OBJECT_MAX_PIXELS} px) "
          f"per frame: share with none {np.mean(counts == 0):.3f}, one {np.mean(counts == 1):.3f},"
          f" more {np.mean(counts > 1):.3f}")
    names = variables(game)
    one = np.flatnonzero(counts == 1)
    for name in BALLS.get(game.rom_id, ()):
        ram = labelled.ram[:, names[name]].astype(float)
        axis = 1 if name.endswith("_x") else 0
        position = np.zeros(len(counts))
        position[one] = [centroids[i][0][axis] for i in one]
        print(f"  {name}: R^2 of RAM value vs the single small object's "
              f"{'column' if axis else 'row'}: {_in_sample_r2([position[one]], ram[one]):.3f} "
              f"({len(one)} frames); on all frames, from (that position, whether one is in "
              f"view): {_in_sample_r2([position, counts == 1], ram):.3f}")


def _evaluates_probe_frames(game_name: str, n_frames: int) -> tuple[Game, ProbeFrames, int]:
    """(game, frames and split, seed) that ``atari-vae evaluate`` probes at its default --seed
    and --max_steps."""
    game, (max_steps, seed) = resolve_game(game_name), _evaluates_probe_episodes()
    return game, probe_frames(game, n_frames, max_steps, seed), seed


def baselines(args: argparse.Namespace) -> None:
    """The probe's reference rows for a game without a trained model: random init, majority."""
    game, (labelled, names, masks), seed = _evaluates_probe_frames(args.game, args.frames)
    shape = VAE(latent_dim=args.latent_dim, base_channels=args.base_channels)
    # Draw k is seeded seed + k; draw 0 is the one evaluate reports beside a model.
    draws = {f"random_init{f'+{k}' if k else ''}": random_init_like(shape, seed + k)
             for k in range(args.init_draws)}
    features = {name: encoder_means(encoder, labelled.frames_uint8)
                for name, encoder in draws.items()}
    if args.pixels:
        features["pixels"] = labelled.frames_uint8.reshape(len(labelled.frames_uint8), -1)
    report = probe_sources(features, labelled.labels(names), list(names), masks,
                           ProbeSettings(seed=seed))
    print(format_probe_table({game.title: report}))
    if args.init_draws > 1:
        scores = np.array([report.score[name] for name in draws])
        print(f"random-init game score over {len(scores)} draws (init seeds {seed}-"
              f"{seed + len(scores) - 1}): min {scores.min():.3f}, median "
              f"{np.median(scores):.3f}, max {scores.max():.3f}, mean {scores.mean():.3f}")


def budget(args: argparse.Namespace) -> None:
    """The probe at evaluate's optimiser budget and with probes trained longer at a higher
    rate, for one model and its random-init encoder, on the same frames and split."""
    game, (labelled, names, masks), seed = _evaluates_probe_frames(args.game, args.frames)
    model = load_state_file(Path(args.model))
    print(f"model: {args.model}")
    features = {"model": encoder_means(model, labelled.frames_uint8),
                "random_init": encoder_means(random_init_like(model, seed), labelled.frames_uint8)}
    budgets = {"protocol": ProbeSettings(seed=seed),
               "longer": ProbeSettings(lr=args.lr, max_epochs=args.max_epochs,
                                       patience=args.patience, seed=seed)}
    for label, settings in budgets.items():
        report = probe_sources(features, labelled.labels(names), list(names), masks, settings)
        print(f"{label}: {settings}")
        print(format_probe_table({game.title: report}))


def _one_object(centroids: list[list[tuple[float, float]]]) -> tuple[np.ndarray, np.ndarray]:
    """((N, 2) (row, col) of the one small object, (N,) whether exactly one is in view), from
    ``_small_object_centroids``; rows without one are 0."""
    in_view = np.array([len(c) == 1 for c in centroids])
    position = np.array([c[0] if len(c) == 1 else (0.0, 0.0) for c in centroids])
    return position, in_view


def ball_codes(position: np.ndarray, in_view: np.ndarray,
               frequencies: tuple[int, ...] = (4, 16)) -> dict[str, torch.Tensor]:
    """Codes of the visible ball's (row, col) in 64x64 pixels: a line, one-hot pixels, and for
    each F in ``frequencies`` cos/sin at F periods from 64 down to 4 px; each with an in-view
    flag (every code is 0 where no ball is in view)."""
    onehot = np.zeros((len(position), 128))
    cells = np.clip(np.rint(position), 0, 63).astype(int)
    onehot[np.arange(len(position)), cells[:, 0]] = 1
    onehot[np.arange(len(position)), 64 + cells[:, 1]] = 1
    codes = {"line": position, "onehot": onehot}
    for count in frequencies:  # the Fourier head's own code, at ``count`` periods
        periods = torch.from_numpy(np.geomspace(64, 4, count))
        codes[f"fourier{count}"] = fourier_code(torch.from_numpy(position), periods).numpy()
    flag = in_view[:, None].astype(np.float64)
    return {name: torch.from_numpy(np.concatenate([flag, code * flag], axis=1)).float()
            for name, code in codes.items()}


def all_objects_code(centroids: list[list[tuple[float, float]]], count: int = 4) -> torch.Tensor:
    """(N, 1 + 4 * count): the number of small objects in view and the sum of their centroids'
    (``_small_object_centroids``) waves at ``count`` periods: one code for any number of them."""
    periods = torch.from_numpy(np.geomspace(64, 4, count))
    rows = [torch.cat([torch.tensor([float(len(c))]),
                       fourier_code(torch.tensor(c, dtype=torch.float64).view(-1, 2),
                                    periods).sum(dim=0)]) for c in centroids]
    return torch.stack(rows).float()


def objects_fourier_code(small: torch.Tensor, x: torch.Tensor, background: torch.Tensor,
                         periods_px: torch.Tensor) -> torch.Tensor:
    """(N, 4P): the sum over ``x``'s small objects (``small``: (N, 1, H, W)) of each one's
    intensity-weighted mean wave, laid out as ``fourier_code``; 0 with none in view. Objects
    within 3 px of each other share their weight, so they count as less than two."""
    intensity = (x.float() - background).abs().amax(dim=1, keepdim=True) * small.float()
    # A small object spans at most 4 pixels, so the 7x7 box around each of its pixels holds all
    # of it: dividing by the box's weight makes each lone object's pixels sum to one, without
    # labelling components (a head's target would have to stay on the device, away from scipy).
    local = torch.nn.functional.avg_pool2d(intensity, 7, stride=1, padding=3) * 49
    share = intensity / local.clamp(min=1e-6)
    axes = []
    for axis, length in enumerate(small.shape[-2:]):
        along = share.sum(dim=3 - axis).flatten(1)  # (N, length): the shares' profile
        pixel = torch.arange(length, device=x.device, dtype=torch.float32).view(-1, 1)
        angle = 2 * math.pi * pixel / periods_px.float()  # (length, P)
        axes.append(torch.stack([along @ angle.cos(), along @ angle.sin()], dim=1))
    return torch.stack(axes, dim=1).flatten(1)


def objects_head_code(frames_uint8: torch.Tensor, mean_frame: torch.Tensor,
                      background: torch.Tensor, anywhere: bool,
                      crowd_reach_px: int = CROWD_REACH_PX) -> torch.Tensor:
    """(N, 16): ``objects_fourier_code`` at the Fourier head's periods, on the small objects
    training finds (``losses.small_objects``), in the usually empty region or anywhere: the
    target `--fourier_objects all` trained on (commit d113c67, removed after)."""
    region = torch.ones_like(background[:, :1]) if anywhere else usually_empty(mean_frame,
                                                                                background)
    out = []
    for start in range(0, len(frames_uint8), 512):
        x = to_float(frames_uint8[start:start + 512])
        small, _ = small_objects(x, background, region, crowd_reach_px=crowd_reach_px)
        out.append(objects_fourier_code(small, x, background, torch.tensor(FOURIER_PERIODS_PX)))
    return torch.cat(out)


def codes(args: argparse.Namespace) -> None:
    """The ball's probe F1 on codes of the pixels' own ball, beside the pixels themselves."""
    game, (labelled, names, masks), seed = _evaluates_probe_frames(args.game, args.frames)
    balls = {name: names[name] for name in BALLS[game.rom_id]}
    # the references and the scipy labelling over every frame, once for all the codes
    mean_frame, background = reference_frames(labelled.frames_uint8)
    centroids = _small_object_centroids(labelled.frames_uint8,
                                        None if args.anywhere else mean_frame, background,
                                        by_intensity=True)
    position, in_view = _one_object(centroids)
    print(f"{game.title}: one small object in view in {in_view.mean():.3f} of "
          f"{len(in_view)} frames")
    features = ball_codes(position, in_view, tuple(args.frequencies))
    if args.all_objects:
        features["all_objects"] = all_objects_code(centroids)
        for reach in args.crowd_reach_px:  # names short enough for the table's columns
            name = "objects_head" if reach == CROWD_REACH_PX else f"obj_head_r{reach}"
            features[name] = objects_head_code(
                labelled.frames_uint8, mean_frame, background, args.anywhere, reach)
    if args.pixels:
        features["pixels"] = labelled.frames_uint8.reshape(len(labelled.frames_uint8), -1)
    report = probe_sources(features, labelled.labels(balls), list(balls), masks,
                           ProbeSettings(seed=seed), in_view)
    print(format_probe_table({game.title: report}))


def rules(args: argparse.Namespace) -> None:
    """Per rule: share of training frames with a small pixel, small pixels a frame, and by row."""
    from atari_vae.data import load_or_collect

    defaults = TrainConfig()
    frames = load_or_collect(resolve_game(args.game), args.num_episodes, defaults.max_steps,
                             defaults.seed, progress=False).frames_uint8
    sample_uint8 = frames[torch.arange(0, len(frames), max(1, len(frames) // args.frames))]
    x, (mean_frame, background) = to_float(sample_uint8), reference_frames(sample_uint8)
    empty, everywhere = usually_empty(mean_frame, background), torch.ones_like(x[:1, :1])
    for name, region, reach in (
            (f"usually empty, reach {CROWD_REACH_PX} (the default)", empty, CROWD_REACH_PX),
            (f"everywhere, reach {CROWD_REACH_PX}", everywhere, CROWD_REACH_PX),
            ("everywhere, reach 0", everywhere, 0)):
        small, _ = small_objects(x, background, region, crowd_reach_px=reach)
        by_row = small.sum(dim=(0, 1, 3)).long().tolist()
        print(f"{name}: {(small.flatten(1).amax(1) > 0).float().mean():.3f} of {len(x)} frames "
              f"show a small pixel, {small.sum() / len(x):.2f} a frame; by row: "
              + " ".join(f"{row}:{n}" for row, n in enumerate(by_row) if n))


def region(args: argparse.Namespace) -> None:
    """Where the ball-finding terms look (``losses.usually_empty``) on train's training frames,
    and the pixels a mean ABSOLUTE deviation test would leave out (measured and not kept,
    docs/results.md): those whose mean frame matches the background while they swing both ways."""
    from atari_vae.data import load_or_collect, split_by_episode
    from atari_vae.losses import EMPTY_DEVIATION, foreground_mask

    defaults = TrainConfig()
    frames = load_or_collect(resolve_game(args.game), defaults.num_episodes, defaults.max_steps,
                             defaults.seed, progress=False)
    frames_uint8 = split_by_episode(frames, defaults.val_split, defaults.seed)[0].frames_uint8[:]
    mean_frame, background = reference_frames(frames_uint8)
    empty = usually_empty(mean_frame, background)
    deviation = torch.zeros_like(background, dtype=torch.float64)
    foreground = torch.zeros_like(background[:, :1], dtype=torch.float64)  # frames per pixel
    for start in range(0, len(frames_uint8), 2048):
        x = to_float(frames_uint8[start:start + 2048])
        deviation += (x - background).abs().sum(dim=0, keepdim=True)
        foreground += foreground_mask(x, background).sum(dim=0, keepdim=True)
    by_deviation = (deviation / len(frames_uint8)).amax(dim=1, keepdim=True) <= EMPTY_DEVIATION
    swinging = ((empty > 0) & ~by_deviation).nonzero()[:, 2:].tolist()
    share = foreground[0, 0] / len(frames_uint8)  # of the frames where each pixel is foreground
    shares = [f"({r}, {c}) foreground in {share[r, c]:.3f}" for r, c in swinging]
    print(f"{args.game}: {int(empty.sum())} usually-empty pixels of {empty.numel()} on "
          f"{len(frames_uint8)} training frames; a mean absolute deviation test would leave out "
          f"{len(swinging)}: " + ", ".join(shares))


def table(args: argparse.Namespace) -> None:
    print("| run | game | score model | random init | majority | ball_x F1 | ball_y F1 | "
          "player F1 | ball_x R2 | ball_y R2 | object recall (base) | fg acc | PSNR (base) |")
    print("|---|" + "---|" * 12)
    for folder in map(Path, args.folders):
        probes = json.loads((folder / "state_probe.json").read_text())
        metrics = json.loads((folder / "metrics.json").read_text())["games"]
        for game, r in probes.items():
            m, f1, r2 = metrics[game], r["f1"].get("model", {}), r["r2"].get("model", {})
            player = next((n for n in ("player_x", "player_y") if n in f1), None)

            def cell(d: dict, k: str | None) -> str:
                return "-" if k is None or d.get(k) is None else f"{d[k]:.3f}"

            print(f"| {folder.parent.name} | {game} | {r['score']['model']:.3f} | "
                  f"{r['score']['random_init']:.3f} | {r['score']['majority']:.3f} | "
                  f"{cell(f1, 'ball_x')} | {cell(f1, 'ball_y')} | {cell(f1, player)} | "
                  f"{cell(r2, 'ball_x')} | {cell(r2, 'ball_y')} | "
                  f"{m['object_recall']:.3f} ({m['baseline_object_recall']:.3f}) | "
                  f"{m['fg_accuracy']:.3f} | {m['psnr']:.2f} ({m['baseline_psnr']:.2f}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("survival", help="does the ball survive the 64x64 resize?")
    p.add_argument("--game", default="Breakout")
    p.add_argument("--frames", type=int, default=EvaluateConfig().probe_frames)
    p.set_defaults(run=survival)
    p = sub.add_parser("baselines", help="random-init encoder and majority class only")
    p.add_argument("--game", default="Pong")
    p.add_argument("--frames", type=int, default=EvaluateConfig().probe_frames)
    p.add_argument("--latent_dim", type=int, default=32)
    p.add_argument("--base_channels", type=int, default=TrainConfig().base_channels,
                   help="the random-init encoder's width (32: the net before 2026-11-30)")
    p.add_argument("--pixels", action="store_true", help="also probe the raw 64x64 RGB pixels")
    p.add_argument("--init_draws", type=int, default=1,
                   help="random-init encoders to probe, seeded seed, seed+1, ...: the spread "
                        "of the control a trained model is compared with")
    p.set_defaults(run=baselines)
    p = sub.add_parser("budget", help="a model's probe at the protocol's budget and a longer one")
    p.add_argument("--game", default="Breakout")
    p.add_argument("--model", required=True, help="a best_model.pt or checkpoint")
    p.add_argument("--frames", type=int, default=EvaluateConfig().probe_frames)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--max_epochs", type=int, default=400)
    p.add_argument("--patience", type=int, default=50)
    p.set_defaults(run=budget)
    p = sub.add_parser("codes", help="the ball's probe on codes of the pixels' own ball")
    p.add_argument("--game", default="Breakout")
    p.add_argument("--frames", type=int, default=EvaluateConfig().probe_frames)
    p.add_argument("--pixels", action="store_true", help="also probe the raw 64x64 RGB pixels")
    p.add_argument("--anywhere", action="store_true",
                   help="count small objects also where the mean frame is not background "
                        "(SpaceInvaders' missile among the invaders)")
    p.add_argument("--all_objects", action="store_true",
                   help="also the sum of every small object's waves (4 periods) and their count")
    p.add_argument("--crowd_reach_px", type=int, nargs="+", default=[CROWD_REACH_PX],
                   help="with --all_objects: how near a crowded pixel drops a small one in the "
                        "code training would use (losses.small_objects; default: training's)")
    p.add_argument("--frequencies", type=int, nargs="+", default=[4, 16],
                   help="numbers of Fourier periods per axis, one code each")
    p.set_defaults(run=codes)
    p = sub.add_parser("rules", help="where the loss's small-object rule finds small pixels")
    p.add_argument("--game", default="SpaceInvaders")
    p.add_argument("--frames", type=int, default=4000, help="training frames, evenly spaced")
    p.add_argument("--num_episodes", type=int, default=TrainConfig().num_episodes,
                   help="of train's collection (its default: the frames training sees)")
    p.set_defaults(run=rules)
    p = sub.add_parser("region", help="where the ball-finding terms look, and the pixels that "
                                      "swing both ways around the background")
    p.add_argument("--game", default="Breakout")
    p.set_defaults(run=region)
    p = sub.add_parser("table", help="markdown table of evaluate folders")
    p.add_argument("folders", nargs="+")
    p.set_defaults(run=table)
    args = parser.parse_args()
    if getattr(args, "init_draws", 1) < 1:
        parser.error(f"--init_draws must be at least 1, got {args.init_draws}")
    args.run(args)


if __name__ == "__main__":
    sys.exit(main())
