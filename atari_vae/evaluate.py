"""The evaluate job: score a VAE on fresh random-policy episodes against the mean-frame baseline.

Per game: ``num_samples`` evenly spaced frames of new episodes (seed ``--seed``) are scored with
``metrics.score``, the code the end of training uses; the mean frame and the static background
come from a separate set of fresh episodes (seed ``--seed`` + REFERENCE_SEED_OFFSET). Games that
AtariARI annotates also get the state probe (``probe.py``) on a third set of episodes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from atari_vae import collect_policy, plots, registry, tracking
from atari_vae.collect_policy import CollectPolicy
from atari_vae.config import EvaluateConfig
from atari_vae.data import FrameSet, load_or_collect
from atari_vae.envs import Game, parse_games, to_float
from atari_vae.files import atomic_write_text
from atari_vae.jobs import RUN_ID_FILE, check_output_dir
from atari_vae.losses import foreground_mask, kl_per_dim
from atari_vae.metrics import reference_frames, score
from atari_vae.model import VAE
from atari_vae.probe import ProbeReport, format_probe_table, probe_metrics, probe_model
from atari_vae.runtime import resolve_device
from atari_vae.state_labels import is_annotated

log = logging.getLogger(__name__)
EVAL_BATCH = 256
MIN_EPISODES = 4
# One episode per 50 scored frames (1000 frames span 20 episodes): what a random policy does
# differs a lot between episodes (which bricks fall, how far Pong rallies go), so few episodes
# make a noisy score.
SCORED_FRAMES_PER_EPISODE = 50
REFERENCE_SEED_OFFSET = 100_000  # ALE seeds envs seed, seed+1, ...: keep the two sets apart
PROBE_SEED_OFFSET = 200_000  # the state probe's labelled episodes: a third, disjoint set
ACTIVE_VARIANCE = 0.01  # a latent dim is active when Var_x(E[z|x]) exceeds this (Burda 2016)
N_PREVIEW = 8
N_PRIOR_SAMPLES = 32
N_TRAVERSAL_DIMS = 6
TRAVERSAL_VALUES = (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)
FIGURES = ("reconstructions.png", "latent_space.png", "prior_samples.png",
           "latent_traversals.png")


@dataclass
class GameResult:
    """One game's metrics plus what the figures need: the scored frames and their latents."""

    game: str
    metrics: dict[str, float]
    frames: FrameSet
    mu: torch.Tensor  # (N, latent_dim) posterior means
    fg_pixels: torch.Tensor  # (N,) foreground pixel count per frame
    background: torch.Tensor  # (1, 3, 64, 64)
    probe: ProbeReport | None = None  # None: no probe asked, or a game AtariARI does not label


def fresh_frames(game: Game, min_frames: int, max_steps: int, seed: int,
                 progress: bool = True, policy: CollectPolicy | None = None) -> FrameSet:
    """At least ``min_frames`` frames of new random-policy episodes; deterministic in the args.

    At least one episode per SCORED_FRAMES_PER_EPISODE frames; more when episodes are short,
    grown from the measured length, so the frames depend only on the arguments.
    """
    episodes = max(MIN_EPISODES, math.ceil(min_frames / SCORED_FRAMES_PER_EPISODE))
    while True:
        frames = load_or_collect(game, episodes, max_steps, seed, progress, policy=policy)
        if len(frames) >= min_frames:
            return frames
        per_episode = len(frames) / episodes
        episodes = max(episodes + 1, math.ceil(1.1 * min_frames / per_episode) + 1)
        log.info("%s: %d frames from %d episodes is short of %d; collecting %d episodes",
                 game.title, len(frames), len(frames.episode_ids.unique()), min_frames, episodes)


def evenly_spaced(frames: FrameSet, n: int) -> FrameSet:
    """Exactly ``n`` frames spread evenly over ``frames`` (which must hold at least ``n``)."""
    if len(frames) < n:
        raise ValueError(f"need {n} frames, have {len(frames)}")
    return frames.subset((torch.arange(n) * len(frames)) // n)


def latent_stats(mu: torch.Tensor, logvar: torch.Tensor) -> dict[str, float]:
    """KL to the prior in nats per frame, and how many latent dims carry information."""
    activity = mu.var(dim=0) if len(mu) > 1 else torch.zeros(mu.shape[1])
    return {"kl": kl_per_dim(mu, logvar).sum().item(),
            "active_dims": float((activity > ACTIVE_VARIANCE).sum())}


@torch.no_grad()
def score_model(model: VAE, frames_uint8: torch.Tensor, mean_frame: torch.Tensor,
                background: torch.Tensor) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """(metrics, posterior means, foreground pixels per frame); reconstructions from z = mu."""
    device = next(model.parameters()).device
    mean_frame, background = mean_frame.to(device), background.to(device)
    mus, logvars, fg_counts = [], [], []

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        mu, logvar = model.encode(x)
        mus.append(mu.float().cpu())
        logvars.append(logvar.float().cpu())
        fg_counts.append(foreground_mask(x, background).flatten(1).sum(1).cpu())
        return model.decode(mu)

    batches = ((to_float(frames_uint8[i:i + EVAL_BATCH].to(device)), mean_frame, background)
               for i in range(0, len(frames_uint8), EVAL_BATCH))
    model.eval()
    metrics = score(reconstruct, batches)
    mu, logvar = torch.cat(mus), torch.cat(logvars)
    metrics.update(latent_stats(mu, logvar))
    metrics["n_frames"] = float(len(frames_uint8))
    return metrics, mu, torch.cat(fg_counts)


def held_out_set(game: Game, cfg: EvaluateConfig) -> tuple[FrameSet, torch.Tensor, torch.Tensor]:
    """The frames to score for ``game``, and the mean frame and background of other episodes
    (both played as ``--collect_policy``/``--policy_mix`` say)."""
    policy = collect_policy.resolve(cfg.collect_policy, cfg.policy_mix, game)
    frames = evenly_spaced(fresh_frames(game, cfg.num_samples, cfg.max_steps, cfg.seed,
                                        policy=policy), cfg.num_samples)
    reference = fresh_frames(game, cfg.num_samples, cfg.max_steps,
                             cfg.seed + REFERENCE_SEED_OFFSET, policy=policy)
    return frames, *reference_frames(reference.frames_uint8)


def evaluate_game(model: VAE, game: Game, cfg: EvaluateConfig) -> GameResult:
    """Collect fresh and reference frames for ``game`` and score ``model`` on them."""
    frames, mean_frame, background = held_out_set(game, cfg)
    metrics, mu, fg_pixels = score_model(model, frames.frames_uint8, mean_frame, background)
    m = metrics
    log.info("%s: psnr %.2f dB (mean frame %.2f), accuracy %.4f (%.4f), fg_psnr %.2f (%.2f), "
             "fg_accuracy %.3f (%.3f) on %d fresh frames", game.title, m["psnr"],
             m["baseline_psnr"], m["accuracy"], m["baseline_accuracy"], m["fg_psnr"],
             m["baseline_fg_psnr"], m["fg_accuracy"], m["baseline_fg_accuracy"], len(frames))
    report = None
    if cfg.probe_frames and is_annotated(game):
        report = probe_model(model, game, cfg.probe_frames, cfg.max_steps,
                             cfg.seed + PROBE_SEED_OFFSET)
        metrics.update(probe_metrics(report))
        log.info("%s: state probe score %.3f (random-init encoder %.3f, majority class %.3f)",
                 game.title, report.score.get("model", math.nan),
                 report.score.get("random_init", math.nan), report.score.get("majority", math.nan))
    elif cfg.probe_frames:
        log.info("%s: no state probe (AtariARI does not annotate this game)", game.title)
    return GameResult(game.title, metrics, frames, mu, fg_pixels, background, report)


def _cell(value: float, fmt: str) -> str:
    return "n/a" if value is None or math.isnan(value) else format(value, fmt)


def format_table(results: dict[str, dict[str, float]], header: str) -> str:
    """A plain-text table, one row per game: model vs mean-frame baseline, all vs foreground."""
    def group(*cells: str) -> str:  # four 7-wide cells: model, base, model, base
        return " ".join(f"{c:>7}" for c in cells)

    lead, gap = f"{'':<16}{'':>7}   ", "     "
    lines = [header, "",
             f"{lead}{'all pixels':^31}{gap}{'foreground pixels':^31}",
             f"{'game':<16}{'frames':>7}   {'PSNR dB':^15} {'accuracy':^15}{gap}"
             f"{'PSNR dB':^15} {'accuracy':^15}   {'fg share':>8}",
             f"{lead}{group('model', 'base', 'model', 'base')}{gap}"
             f"{group('model', 'base', 'model', 'base')}"]
    for game, m in results.items():
        cells = [_cell(m[k], f) for k, f in (
            ("psnr", ".2f"), ("baseline_psnr", ".2f"), ("accuracy", ".4f"),
            ("baseline_accuracy", ".4f"), ("fg_psnr", ".2f"), ("baseline_fg_psnr", ".2f"),
            ("fg_accuracy", ".3f"), ("baseline_fg_accuracy", ".3f"))]
        lines.append(f"{game:<16}{int(m['n_frames']):>7}   {group(*cells[:4])}{gap}"
                     f"{group(*cells[4:])}   {100 * m['fg_fraction']:>6.2f} %")
    lines += ["", f"{'game':<16}{'PSNR per frame: median':>24}{'5th pct':>9}"
                  f"{'KL nats/frame':>15}{'active dims':>13}"
                  f"{'small objects/frame':>21}{'object recall (base)':>22}"]
    for game, m in results.items():
        recall = (f"{_cell(m['object_recall'], '.3f')} "
                  f"({_cell(m['baseline_object_recall'], '.3f')})")
        lines.append(f"{game:<16}{m['psnr_median']:>24.2f}{m['psnr_p05']:>9.2f}"
                     f"{m['kl']:>15.2f}{int(m['active_dims']):>13}"
                     f"{m['objects_per_frame']:>21.2f}{recall:>22}")
    lines += ["", "base: a model that ignores its input and always outputs the mean frame of a "
              "separate set of fresh frames.",
              "foreground: pixels differing from the game's static background (per-pixel median "
              "of that separate set) by > 0.1 in any channel.",
              "accuracy: share of values within 0.1 of the original; PSNR = 10 log10(1 / MSE) "
              "over values in [0, 1].",
              "object recall: of the small moving objects (8-connected foreground, <= 4 pixels, "
              "where the mean frame shows background: balls, bullets), the share the "
              "reconstruction shows within one pixel.",
              "A model has learned the game only where it beats base, above all on the "
              "foreground columns.", ""]
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN; a game without foreground pixels has no fg_*
    return value


def metrics_document(results: dict[str, dict[str, float]], cfg: EvaluateConfig,
                     latent_dim: int) -> dict[str, Any]:
    """metrics.json: run facts, per-game metrics, and for one game the same keys at top level."""
    doc: dict[str, Any] = {"model_path": cfg.model_path, "latent_dim": latent_dim,
                           "seed": cfg.seed, "reference_seed": cfg.seed + REFERENCE_SEED_OFFSET,
                           "num_samples": cfg.num_samples, "collect_policy": cfg.collect_policy,
                           "policy_mix": cfg.policy_mix, "games": results}
    if len(results) == 1:
        doc.update(next(iter(results.values())))
    return doc


def mlflow_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """Plain keys for one game (as training logs them), ``<Game>/<key>`` for several."""
    if len(results) == 1:
        return dict(next(iter(results.values())))
    return {f"{game}/{k}": v for game, m in results.items() for k, v in m.items()}


def _preview_index(fg_pixels: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` frames spread over those with the most foreground, so missed objects show."""
    candidates = (fg_pixels >= fg_pixels.float().median()).nonzero().squeeze(1)
    if (fg_pixels[candidates] > 0).any():
        candidates = candidates[fg_pixels[candidates] > 0]
    n = min(n, len(candidates))
    return candidates[((2 * torch.arange(n) + 1) * len(candidates)) // (2 * n)]  # centred picks


@torch.no_grad()
def write_figures(model: VAE, results: list[GameResult], out: Path, seed: int) -> list[Path]:
    """The four evaluation figures; with several games each figure covers every game."""
    device = next(model.parameters()).device
    per_game = max(2, N_PREVIEW // len(results))
    originals, labels = [], []
    for r in results:
        index = _preview_index(r.fg_pixels, per_game)
        originals.append(to_float(r.frames.frames_uint8[index]))
        labels += [f"{r.game} t={int(t)}" for t in r.frames.steps[index]]
    x = torch.cat(originals).to(device)
    recons = model.decode(model.encode(x)[0])
    games = ", ".join(r.game for r in results)
    paths = [plots.reconstructions(x, recons, out / FIGURES[0], f"fresh frames ({games}): "
                                   "most foreground; bright error = missed pixels", labels)]
    paths.append(_latent_figure(results, out / FIGURES[1]))
    generator = torch.Generator().manual_seed(seed)
    paths.append(plots.image_grid(model.sample(N_PRIOR_SAMPLES, generator), out / FIGURES[2],
                                  "decoded prior samples z ~ N(0, I)"))
    paths.append(_traversal_figure(model, results[0], x[:1], out / FIGURES[3]))
    return paths


def _latent_figure(results: list[GameResult], path: Path) -> Path:
    """PCA of all games' latent means (numpy-free SVD), one panel per game, colored by time."""
    mu = torch.cat([r.mu for r in results]).double()
    centered = mu - mu.mean(dim=0)
    _, _, vh = torch.linalg.svd(centered, full_matrices=False)
    points = (centered @ vh[:2].T).numpy()
    if points.shape[1] < 2:  # latent_dim 1: put everything on one axis
        points = torch.nn.functional.pad(torch.from_numpy(points), (0, 1)).numpy()
    panels, start = [], 0
    for r in results:
        panels.append((r.game, points[start:start + len(r.mu)], r.frames.steps.numpy()))
        start += len(r.mu)
    return plots.latent_panels(panels, path, "step in episode",
                               "latent means, first two principal components")


def _traversal_figure(model: VAE, result: GameResult, frame: torch.Tensor, path: Path) -> Path:
    """Decode one frame's latent mean while moving its most active dims through the prior."""
    dims = result.mu.var(dim=0).argsort(descending=True)[:N_TRAVERSAL_DIMS].tolist()
    base = model.encode(frame)[0][0]
    rows = []
    for dim in dims:
        z = base.repeat(len(TRAVERSAL_VALUES), 1)
        z[:, dim] = torch.tensor(TRAVERSAL_VALUES, device=z.device)
        rows.append(model.decode(z))
    return plots.traversals(torch.stack(rows), TRAVERSAL_VALUES, dims, path)


def _write_probe(results: list[GameResult], out: Path) -> list[Path]:
    """state_probe.txt and state_probe.json (every variable, source and category), if probed."""
    reports = {r.game: r.probe for r in results if r.probe is not None}
    if not reports:
        return []
    atomic_write_text(out / "state_probe.txt", format_probe_table(reports))
    doc = _json_safe({game: dataclasses.asdict(r) for game, r in reports.items()})
    atomic_write_text(out / "state_probe.json", json.dumps(doc, indent=2) + "\n")
    return [out / "state_probe.txt", out / "state_probe.json"]


def _tags(cfg: EvaluateConfig, games: list[str], latent_dim: int) -> dict[str, str]:
    """Base tags plus what model was evaluated (and its training run, when known)."""
    tags = tracking.base_tags("evaluate", games)
    path = Path(cfg.model_path)
    is_file = path.is_file()
    tags.update({"evaluated_model": str(path.resolve()) if is_file else cfg.model_path,
                 "evaluated_latent_dim": str(latent_dim)})
    if cfg.collect_policy != "random":
        tags["collect_policy"] = _players(cfg)
    if cfg.model_path.startswith("runs:/"):
        tags["evaluated_run_id"] = cfg.model_path.split("/")[1]
    elif is_file and (path.parent / RUN_ID_FILE).is_file():
        tags["evaluated_run_id"] = (path.parent / RUN_ID_FILE).read_text().strip()
    return tags


def _players(cfg: EvaluateConfig) -> str:
    if cfg.collect_policy == "random":
        return "random-policy"
    return f"{cfg.collect_policy} (mix {cfg.policy_mix:g})"


def evaluate_job(cfg: EvaluateConfig) -> dict[str, Any]:
    """Validate flags, load the model, score it per game and write/log the outputs.

    Returns the metrics.json document plus ``run_id``.
    """
    cfg.validate()
    games = parse_games(cfg.env_name)
    device = resolve_device(cfg.device)
    model = registry.load_model(cfg.model_path, device)  # before output_dir: a typo leaves no dir
    out = check_output_dir(cfg.output_dir)
    titles = [g.title for g in games]
    tracking.configure(cfg.experiment_name)
    with tracking.tracked_run(f"evaluate-{'+'.join(titles)}",
                              _tags(cfg, titles, model.latent_dim)) as run:
        tracking.log_config(cfg)
        results = [evaluate_game(model, game, cfg) for game in games]
        per_game = {r.game: r.metrics for r in results}
        doc = _json_safe(metrics_document(per_game, cfg, model.latent_dim))
        header = (f"atari-vae evaluation of {cfg.model_path} (latent_dim {model.latent_dim})\n"
                  f"{cfg.num_samples} frames per game from fresh {_players(cfg)} episodes, seed "
                  f"{cfg.seed}; mean frame and background from seed "
                  f"{cfg.seed + REFERENCE_SEED_OFFSET}")
        atomic_write_text(out / "metrics.txt", format_table(per_game, header))
        atomic_write_text(out / "metrics.json", json.dumps(doc, indent=2) + "\n")
        figures = write_figures(model, results, out, cfg.seed)
        figures += _write_probe(results, out)
        tracking.log_metrics(mlflow_metrics(per_game))
        tracking.log_files([out / "metrics.txt", out / "metrics.json", *figures])
        log.info("wrote metrics.txt, metrics.json and %d figures to %s (MLflow run %s)",
                 len(figures), out, run.info.run_id)
    return {**doc, "run_id": run.info.run_id}
