"""Linear state probes (the AtariARI protocol): how much of the game state a code holds.

Per RAM variable, a linear 256-way classifier on frozen features, trained with cross-entropy and
early stopping on a validation split of other episodes, scored by weighted F1 on test episodes;
F1s are averaged within AtariARI's categories, then across them (the game score). Variables
with under 0.6 nats of entropy on the probe-train labels are dropped, as AtariARI does. For
coordinates, a linear regression's R^2 on the test episodes measures what a planner can read;
for small objects (ball, shots) also on the frames whose pixels show exactly one, since the RAM
keeps a position for a ball that is off screen, which no encoder of the pixels can know.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from atari_vae.envs import Game, to_float
from atari_vae.metrics import reference_frames, small_object_labels
from atari_vae.model import VAE, random_init_like
from atari_vae.state_labels import (
    CATEGORIES,
    LabelledFrames,
    categories_of,
    entropy_nats,
    is_coordinate,
    load_or_collect_labelled,
    variables,
)

log = logging.getLogger(__name__)
ENTROPY_THRESHOLD = 0.6  # nats; AtariARI drops variables below it
VAL_FROM, TEST_FROM = 0.7, 0.8  # of the shuffled episodes: 70 % train, 10 % val, 20 % test
MAJORITY = "majority"


@dataclass
class ProbeSettings:
    """Optimiser settings of the linear probes (AtariARI: Adam 5e-4, batch 64, patience 15)."""

    lr: float = 2e-3
    batch_size: int = 256
    max_epochs: int = 100
    patience: int = 15
    seed: int = 0


def split_episodes(episode_ids: np.ndarray, seed: int) -> tuple[np.ndarray, ...]:
    """(train, val, test) boolean masks: 70 / 10 / 20 % of the shuffled episodes."""
    episodes = np.unique(episode_ids)
    if len(episodes) < 3:
        raise ValueError(f"a probe needs at least 3 episodes (train, val, test), got "
                         f"{len(episodes)}")
    order = np.random.default_rng(seed).permutation(episodes)
    n_train = min(max(1, int(VAL_FROM * len(order))), len(order) - 2)
    n_val = min(max(1, int(TEST_FROM * len(order)) - n_train), len(order) - n_train - 1)
    parts = (order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:])
    return tuple(np.isin(episode_ids, part) for part in parts)


def drop_seen(test: np.ndarray, seen: np.ndarray, frames_uint8: torch.Tensor) -> np.ndarray:
    """``test`` without frames whose pixels also occur in ``seen`` rows (AtariARI does this)."""
    flat = frames_uint8.reshape(len(frames_uint8), -1).numpy()
    known = {flat[i].tobytes() for i in np.flatnonzero(seen)}
    return test & np.array([not (t and flat[i].tobytes() in known)
                            for i, t in enumerate(test)])


class LinearProbes(torch.nn.Module):
    """One linear classifier per variable on standardised features.

    A variable's classes are the byte values seen in its probe-train labels: a 256-way softmax
    never predicts a value it was never shown (those logits only fall), so the others are left
    out, which saves most of the compute.
    """

    def __init__(self, classes: list[torch.Tensor], mean: torch.Tensor,
                 std: torch.Tensor) -> None:
        super().__init__()
        self.classes = classes  # per variable: (C_v,) sorted byte values
        sizes = [len(c) for c in classes]
        self.bounds = np.cumsum([0, *sizes]).tolist()
        # One (D, sum C_v) matrix: a single GEMM for all probes, each its own columns.
        self.weight = torch.nn.Parameter(torch.zeros(len(mean), self.bounds[-1]))
        self.bias = torch.nn.Parameter(torch.zeros(self.bounds[-1]))
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) features -> (N, sum C_v) logits, variable v in columns bounds[v]:bounds[v+1]."""
        return torch.addmm(self.bias, (x - self.mean) / self.std, self.weight)

    def columns(self, v: int) -> slice:
        """Variable ``v``'s logit columns."""
        return slice(self.bounds[v], self.bounds[v + 1])

    def local_targets(self, y: torch.Tensor) -> torch.Tensor:
        """(N, V) byte labels -> indices into each variable's classes (labels must be seen)."""
        return torch.stack([torch.searchsorted(c, y[:, v].contiguous())
                            for v, c in enumerate(self.classes)],
                           dim=1)

    def loss(self, x: torch.Tensor, y_local: torch.Tensor) -> torch.Tensor:
        """Sum over variables of the mean cross-entropy."""
        logits = self(x)
        return sum(torch.nn.functional.cross_entropy(logits[:, self.columns(v)], y_local[:, v])
                   for v in range(len(self.classes)))

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
        """(N, D) -> (N, V) predicted byte value per variable."""
        out = []
        for i in range(0, len(x), batch):
            logits = self(x[i:i + batch])
            out.append(torch.stack([c[logits[:, self.columns(v)].argmax(1)]
                                    for v, c in enumerate(self.classes)], dim=1))
        return torch.cat(out)


def fit_linear_probes(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor,
                      y_val: torch.Tensor, settings: ProbeSettings) -> LinearProbes:
    """Train the probes; each variable keeps its weights from its best validation accuracy.

    Variables are independent (separate weights, per-parameter Adam), so training them in one
    matrix equals training one probe each; once a variable has not improved for ``patience``
    epochs its best weights are final.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    classes = [y_train[:, v].unique() for v in range(y_train.shape[1])]
    probes = LinearProbes(classes, x_train.mean(dim=0), x_train.std(dim=0).clamp(min=1e-6))
    y_local = probes.local_targets(y_train)
    optimizer = torch.optim.Adam(probes.parameters(), lr=settings.lr)
    n_vars = len(classes)
    best = torch.full((n_vars,), -1.0)
    best_weight, best_bias = probes.weight.detach().clone(), probes.bias.detach().clone()
    waited = torch.zeros(n_vars, dtype=torch.int64)
    for _ in range(settings.max_epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), settings.batch_size):
            index = order[start:start + settings.batch_size]
            optimizer.zero_grad(set_to_none=True)
            probes.loss(x_train[index], y_local[index]).backward()
            optimizer.step()
        accuracy = (probes.predict(x_val) == y_val).float().mean(dim=0)
        better = (accuracy > best) & (waited < settings.patience)
        for v in better.nonzero().flatten().tolist():
            best[v] = accuracy[v]
            best_weight[:, probes.columns(v)] = probes.weight.detach()[:, probes.columns(v)]
            best_bias[probes.columns(v)] = probes.bias.detach()[probes.columns(v)]
        waited = torch.where(better, 0, waited + 1)
        if bool((waited >= settings.patience).all()):
            break
    with torch.no_grad():
        probes.weight.copy_(best_weight)
        probes.bias.copy_(best_bias)
    return probes


def weighted_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """F1 per class weighted by the class's support in ``y_true`` (AtariARI's measure)."""
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, average="weighted", zero_division=0))


def linear_r2(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
              y_test: torch.Tensor) -> torch.Tensor:
    """(V,) R^2 on the test rows of least-squares fits y ~ x (with intercept) on the train rows.

    NaN where a variable is constant on the test rows.
    """
    def design(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)

    coef = torch.linalg.lstsq(design(x_train), y_train.double()).solution
    residual = (y_test.double() - design(x_test) @ coef).pow(2).sum(dim=0)
    total = (y_test.double() - y_test.double().mean(dim=0)).pow(2).sum(dim=0)
    return torch.where(total > 0, 1.0 - residual / total.clamp(min=1e-12),
                       torch.tensor(float("nan"), dtype=torch.float64))


def game_score(f1_by_variable: dict[str, float]) -> tuple[float, dict[str, float]]:
    """(mean over categories of the mean F1 within each, per-category means)."""
    per_category = {}
    for category in CATEGORIES:
        values = [f1 for name, f1 in f1_by_variable.items() if category in categories_of(name)]
        if values:
            per_category[category] = float(np.mean(values))
    score = float(np.mean(list(per_category.values()))) if per_category else float("nan")
    return score, per_category


@dataclass
class ProbeReport:
    """One game's probe results for several feature sources ("model", "random_init", ...)."""

    variables: list[str]  # kept (entropy >= ENTROPY_THRESHOLD), in annotation order
    dropped: list[str]
    entropy: dict[str, float]
    f1: dict[str, dict[str, float]] = field(default_factory=dict)  # source -> variable -> F1
    r2: dict[str, dict[str, float]] = field(default_factory=dict)  # source -> coordinate -> R^2
    # source -> small-object coordinate -> R^2 on frames showing exactly one small object
    r2_on_screen: dict[str, dict[str, float]] = field(default_factory=dict)
    score: dict[str, float] = field(default_factory=dict)  # source -> game score
    categories: dict[str, dict[str, float]] = field(default_factory=dict)
    n_frames: dict[str, int] = field(default_factory=dict)  # train / val / test


def probe_sources(features: dict[str, torch.Tensor], labels: np.ndarray, names: list[str],
                  masks: tuple[np.ndarray, ...], settings: ProbeSettings,
                  on_screen: np.ndarray | None = None) -> ProbeReport:
    """Probe each source's (N, D) features for the (N, V) ``labels``, plus the majority class.

    ``masks``: (train, val, test) boolean rows, as ``split_episodes`` (and ``drop_seen``) give;
    ``on_screen``: (N,) bool rows showing exactly one small object (``one_small_object``).
    """
    train, val, test = masks
    entropy = dict(zip(names, entropy_nats(labels[train]).tolist(), strict=True))
    keep = [i for i, n in enumerate(names) if entropy[n] >= ENTROPY_THRESHOLD]
    report = ProbeReport([names[i] for i in keep],
                         [n for n in names if entropy[n] < ENTROPY_THRESHOLD], entropy,
                         n_frames={"train": int(train.sum()), "val": int(val.sum()),
                                   "test": int(test.sum())})
    if not keep:
        return report
    y = torch.from_numpy(labels[:, keep])
    majority = torch.mode(y[train], dim=0).values
    sources = {MAJORITY: None, **features}
    coordinates = [i for i, n in enumerate(report.variables) if is_coordinate(n)]
    small = [i for i in coordinates
             if "small_object_localization" in categories_of(report.variables[i])]
    for source, x in sources.items():
        if x is None:
            predicted = majority.expand(int(test.sum()), -1)
        else:
            x = x.float()
            probes = fit_linear_probes(x[train], y[train], x[val], y[val], settings)
            predicted = probes.predict(x[test])
            if r2 := _r2_by_name(x, y, train, test, coordinates, report.variables):
                report.r2[source] = r2
            if on_screen is not None and (r2 := _r2_by_name(
                    x, y, train & on_screen, test & on_screen, small, report.variables)):
                report.r2_on_screen[source] = r2
        report.f1[source] = {name: weighted_f1(y[test][:, i].numpy(), predicted[:, i].numpy())
                             for i, name in enumerate(report.variables)}
        report.score[source], report.categories[source] = game_score(report.f1[source])
        log.info("probe %s: game score %.3f", source, report.score[source])
    return report


MIN_ROWS_PER_COEFFICIENT = 10


def _r2_by_name(x: torch.Tensor, y: torch.Tensor, train: np.ndarray, test: np.ndarray,
                columns: list[int], names: list[str]) -> dict[str, float]:
    """{variable: test R^2 of a linear regression fitted on the train rows}, for ``columns``."""
    # Under ~10 rows a coefficient an unregularised line fits noise (the 12,288 pixels of
    # 14,013 probe-train frames scored R^2 ~0): no figure rather than a misleading one.
    if not columns or train.sum() < MIN_ROWS_PER_COEFFICIENT * x.shape[1] or not test.any():
        return {}
    r2 = linear_r2(x[train], y[train][:, columns], x[test], y[test][:, columns])
    return {names[i]: float(v) for i, v in zip(columns, r2, strict=True)}


def one_small_object(frames_uint8: torch.Tensor, chunk: int = 512) -> np.ndarray:
    """(N,) bool: frames showing exactly one small moving object, as the object metric counts
    them against these frames' own mean frame and background (pixels only, no RAM)."""
    mean_frame, background = reference_frames(frames_uint8)
    counts = []
    for start in range(0, len(frames_uint8), chunk):
        labels, is_object = small_object_labels(to_float(frames_uint8[start:start + chunk]),
                                                background, mean_frame)
        counts += [int(is_object[np.unique(frame)].sum()) for frame in labels]
    return np.array(counts) == 1


@torch.no_grad()
def encoder_means(model: VAE, frames_uint8: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """(N, latent_dim) float32 posterior means of (N, 3, 64, 64) uint8 frames, on the CPU."""
    device = next(model.parameters()).device
    model.eval()
    return torch.cat([model.encode(to_float(frames_uint8[i:i + batch].to(device)))[0].float().cpu()
                      for i in range(0, len(frames_uint8), batch)])


class ProbeFrames(NamedTuple):
    """One game's labelled fresh frames and their probe split."""

    labelled: LabelledFrames
    names: dict[str, int]  # variable -> RAM byte
    masks: tuple[np.ndarray, np.ndarray, np.ndarray]  # train, val, test


def probe_frames(game: Game, n_frames: int, max_steps: int, seed: int) -> ProbeFrames:
    """``n_frames`` labelled frames of episodes seeded ``seed``, split by episode 70/10/20 into
    probe-train, validation and test (test frames also seen in train/val are dropped)."""
    labelled = load_or_collect_labelled(game, n_frames, max_steps, seed)
    train, val, test = split_episodes(labelled.episode_ids, seed)
    test = drop_seen(test, train | val, labelled.frames_uint8)
    return ProbeFrames(labelled, variables(game), (train, val, test))


def probe_model(model: VAE, game: Game, n_frames: int, max_steps: int, seed: int,
                settings: ProbeSettings | None = None) -> ProbeReport:
    """Probe ``model``'s mu, a random-init encoder's and the majority class on the frames of
    ``probe_frames``."""
    labelled, names, masks = probe_frames(game, n_frames, max_steps, seed)
    features = {"model": encoder_means(model, labelled.frames_uint8),
                "random_init": encoder_means(random_init_like(model, seed),
                                             labelled.frames_uint8)}
    return probe_sources(features, labelled.labels(names), list(names), masks,
                         settings or ProbeSettings(seed=seed),
                         one_small_object(labelled.frames_uint8))


def probe_metrics(report: ProbeReport) -> dict[str, float]:
    """Flat MLflow metrics: game scores per source, and the model's F1 and R^2 per variable."""
    out = {("probe_score" if s == "model" else f"probe_score_{s}"): v
           for s, v in report.score.items()}
    out.update({f"probe_f1_{n}": v for n, v in report.f1.get("model", {}).items()})
    out.update({f"probe_r2_{n}": v for n, v in report.r2.get("model", {}).items()})
    out.update({f"probe_r2_on_screen_{n}": v
                for n, v in report.r2_on_screen.get("model", {}).items()})
    return out


def format_probe_table(reports: dict[str, ProbeReport]) -> str:
    """Per game: a row per kept variable (entropy, F1 per source, R^2 per source, on all test
    frames and on those showing one small object), then scores."""
    lines = ["State probe (AtariARI protocol): linear probes on frozen features, weighted F1 "
             "on test episodes; R^2 of a linear regression for coordinates.", ""]
    for game, r in reports.items():
        sources = list(r.f1)
        r2_columns = [(f"R2 {s}", r.r2[s]) for s in r.r2] + [
            (f"R2 1-obj {s}", r.r2_on_screen[s]) for s in r.r2_on_screen]
        lines.append(f"{game}: {r.n_frames['train']} probe-train / {r.n_frames['val']} val / "
                     f"{r.n_frames['test']} test frames; dropped (< {ENTROPY_THRESHOLD} nats): "
                     f"{', '.join(r.dropped) or 'none'}")
        # a column is at least 16 wide, and wide enough that its title never runs into the next
        w = {s: max(16, len(s) + 5) for s in sources}
        v = {title: max(22, len(title) + 2) for title, _ in r2_columns}
        lines.append(f"{'variable':<26}{'nats':>6}" + "".join(f"{'F1 ' + s:>{w[s]}}"
                                                             for s in sources)
                     + "".join(f"{title:>{v[title]}}" for title, _ in r2_columns))
        for name in r.variables:
            row = f"{name:<26}{r.entropy[name]:>6.2f}"
            row += "".join(f"{r.f1[s][name]:>{w[s]}.3f}" for s in sources)
            row += "".join(f"{r2[name]:>{v[title]}.3f}" if name in r2 else " " * v[title]
                           for title, r2 in r2_columns)
            lines.append(row)
        for category in CATEGORIES:
            if sources and category in r.categories[sources[0]]:
                lines.append(f"{'  ' + category:<32}" + "".join(
                    f"{r.categories[s][category]:>{w[s]}.3f}" for s in sources))
        lines.append(f"{'game score':<32}" + "".join(f"{r.score[s]:>{w[s]}.3f}"
                                                      for s in sources))
        lines.append("")
    return "\n".join(lines)
