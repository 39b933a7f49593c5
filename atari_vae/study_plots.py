"""Figures of a finished study: optimization history, parameter importances, intermediate
values and held-out KL vs balanced PSNR, as PNG files for the tune run's ``study_plots/``."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any

import optuna

from atari_vae.files import atomic_path

log = logging.getLogger(__name__)


def study_figures(study: optuna.Study, out: Path, budget: float) -> list[Path]:
    """Optimization history, param importances and rate vs reconstruction, as PNG files."""
    from optuna.visualization import matplotlib as ovm  # headless: train imports plots (Agg)

    makers = {"optimization_history.png": lambda: ovm.plot_optimization_history(study),
              "param_importances.png": lambda: ovm.plot_param_importances(study),
              "intermediate_values.png": lambda: ovm.plot_intermediate_values(study),
              "rate_vs_reconstruction.png": lambda: _rate_axes(study, budget)}
    paths = []
    for name, make in makers.items():
        try:
            with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                paths.append(_save_axes(make(), out / name))
        except Exception as exc:  # e.g. importances need two complete trials
            log.info("skipping %s: %s", name, str(exc).splitlines()[0] if str(exc) else exc)
    return paths


def _rate_axes(study: optuna.Study, budget: float) -> Any:
    import matplotlib.pyplot as plt

    done = [t for t in study.get_trials(deepcopy=False) if "kl" in t.user_attrs and t.value]
    if not done:
        raise ValueError("no complete trial")
    _, ax = plt.subplots(figsize=(6, 4.5))
    points = ax.scatter([t.user_attrs["kl"] for t in done], [t.value for t in done],
                        c=[math.log10(t.params["kl_weight"]) for t in done], cmap="viridis")
    plt.colorbar(points, ax=ax, label="log10 kl_weight")
    ax.axvline(budget, ls="--", c="gray", label=f"kl_budget {budget:g}")
    ax.set(xlabel="held-out KL (nats/frame)", ylabel="held-out balanced PSNR (dB)",
           title="trials: reconstruction vs rate (left of the line: feasible)")
    ax.legend()
    return ax


def _save_axes(axes: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
