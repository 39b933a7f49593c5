"""Figures of a finished study."""

from __future__ import annotations

from pathlib import Path

import optuna
from PIL import Image

from atari_vae.study_plots import study_figures


def test_study_figures_are_written_as_png_for_a_study_with_complete_trials(
        tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize")
    space = {"kl_weight": optuna.distributions.FloatDistribution(1e-3, 10, log=True),
             "latent_dim": optuna.distributions.CategoricalDistribution([8, 16])}
    for i, (kl_weight, latent_dim) in enumerate([(0.01, 8), (0.1, 16), (1.0, 8), (0.3, 16)]):
        study.add_trial(optuna.trial.create_trial(
            params={"kl_weight": kl_weight, "latent_dim": latent_dim}, distributions=space,
            value=30.0 - i, intermediate_values={1: 10.0 + i}, user_attrs={"kl": 20.0 * i}))
    paths = study_figures(study, tmp_path, budget=50.0)
    assert {p.name for p in paths} == {"optimization_history.png", "param_importances.png",
                                       "intermediate_values.png", "rate_vs_reconstruction.png"}
    for path in paths:
        assert Image.open(path).size[0] > 100


def test_a_study_without_complete_trials_skips_the_rate_figure_without_error(
        tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize")
    names = {p.name for p in study_figures(study, tmp_path, budget=50.0)}
    assert "rate_vs_reconstruction.png" not in names
