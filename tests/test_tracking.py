"""tracking.py: the UI names of metrics, and what a run records in the local store."""

from __future__ import annotations

import mlflow
import pytest

from atari_vae import tracking


@pytest.mark.parametrize("name, per_epoch, shown", [
    ("train_loss", True, "train/loss"), ("val_fg_psnr", True, "val/fg_psnr"),
    ("lr", True, "train/lr"), ("epoch_seconds", True, "train/epoch_seconds"),
    ("baseline_psnr", True, "val/baseline_psnr"), ("val_balanced_psnr", True,
                                                   "val/balanced_psnr"),
    ("psnr", False, "final/psnr"), ("baseline_psnr", False, "final/baseline_psnr"),
    ("best_value", False, "study/best_value"), ("n_train_frames", False, "data/n_train_frames"),
    ("probe_score", False, "probe/score"), ("probe_f1_ball_x", False, "probe/f1_ball_x"),
    ("Breakout/psnr", False, "Breakout/psnr")])
def test_metric_names_are_grouped_into_ui_sections(name, per_epoch, shown):
    assert tracking.metric_key(name, per_epoch) == shown


def test_a_models_end_of_run_figures_sort_after_the_per_epoch_curves():
    final = tracking.metric_key("psnr", of_model=True)
    assert final == "val_best/psnr"
    sections = [k.split("/")[0] for k in (tracking.metric_key("train_loss", True),
                                          tracking.metric_key("val_loss", True), final)]
    assert sections == sorted(sections)  # the UI sorts its chart sections by name


def test_per_epoch_and_final_values_of_one_name_stay_apart(tmp_path):
    tracking.configure("sections")
    with tracking.tracked_run("r", {"optuna_trial": 7}) as run:
        tracking.log_metrics({"baseline_psnr": 30.0}, step=1, per_epoch=True)
        tracking.log_metrics({"baseline_psnr": 31.0}, step=1)
    stored = mlflow.MlflowClient().get_run(run.info.run_id)
    assert stored.data.metrics == {"val/baseline_psnr": 30.0, "final/baseline_psnr": 31.0}
    assert stored.data.tags["optuna_trial"] == "7"
    assert "tracking_retried_points" not in stored.data.tags  # nothing was held back
