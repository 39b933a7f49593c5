"""Metric code on hand-made tensors whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from atari_vae.metrics import (
    Scorer,
    game_references,
    psnr_from_mse,
    reference_frames,
    score,
    small_objects_found,
)

SHAPE = (3, 64, 64)


def _score(recon_fn, frames, mean_frame=None, background=None, batch=None):
    mean_frame = frames.mean(0, keepdim=True) if mean_frame is None else mean_frame
    background = torch.zeros(1, *SHAPE) if background is None else background
    batch = batch or len(frames)
    batches = [(frames[i:i + batch], mean_frame, background)
               for i in range(0, len(frames), batch)]
    return score(recon_fn, batches)


def _frames_with_square(n: int = 4, size: int = 2) -> torch.Tensor:
    """Black frames, each with a small white square (the "ball") at a different place."""
    frames = torch.zeros(n, *SHAPE)
    for i in range(n):
        frames[i, :, 10 * i:10 * i + size, 20:20 + size] = 1.0
    return frames


def test_perfect_reconstruction_scores_accuracy_one_mse_zero_and_high_psnr():
    frames = torch.rand(6, *SHAPE)
    m = _score(lambda x: x.clone(), frames, background=torch.full((1, *SHAPE), 0.5))
    assert m["mse"] == 0.0
    assert m["accuracy"] == 1.0
    assert m["fg_accuracy"] == 1.0
    assert m["psnr"] >= 100 and m["psnr_p05"] >= 100


def test_psnr_of_a_constant_error_follows_the_formula():
    frames = torch.full((3, *SHAPE), 0.5)
    m = _score(lambda x: x + 0.05, frames)
    assert m["mse"] == pytest.approx(0.0025, rel=1e-5)
    assert m["psnr"] == pytest.approx(10 * math.log10(1 / 0.0025), abs=1e-3)  # 26.02 dB
    assert m["psnr_median"] == pytest.approx(26.0206, abs=1e-3)
    assert m["accuracy"] == 1.0  # 0.05 is within the 0.1 tolerance
    assert _score(lambda x: x + 0.2, frames)["accuracy"] == 0.0
    assert psnr_from_mse(0.01) == pytest.approx(20.0)


def test_mean_frame_model_scores_exactly_the_baseline_keys():
    frames = torch.rand(10, *SHAPE)
    mean_frame = torch.rand(1, *SHAPE)
    background = frames.median(dim=0, keepdim=True).values
    m = _score(lambda x: mean_frame.expand_as(x), frames, mean_frame, background, batch=3)
    for key in ("mse", "psnr", "accuracy", "fg_mse", "fg_psnr", "fg_accuracy", "psnr_median",
                "psnr_p05"):
        assert m[key] == pytest.approx(m[f"baseline_{key}"], rel=1e-6), key


def test_baseline_of_black_and_white_frames_is_grey_with_known_scores():
    frames = torch.stack([torch.zeros(SHAPE), torch.ones(SHAPE)])
    m = _score(lambda x: x, frames)
    assert m["baseline_mse"] == pytest.approx(0.25)
    assert m["baseline_psnr"] == pytest.approx(10 * math.log10(4))
    assert m["baseline_accuracy"] == 0.0


def test_missing_small_object_drops_fg_accuracy_while_accuracy_stays_high():
    frames = _frames_with_square()
    background = torch.zeros(1, *SHAPE)
    m = _score(lambda x: background.expand_as(x), frames, background=background)
    object_values = 3 * 2 * 2
    assert m["accuracy"] == pytest.approx(1 - object_values / (3 * 64 * 64))  # 0.999
    assert m["fg_accuracy"] == 0.0
    assert m["fg_mse"] == pytest.approx(1.0)
    assert m["fg_psnr"] == pytest.approx(0.0)
    assert m["fg_fraction"] == pytest.approx(4 / (64 * 64))
    assert m["psnr"] > 30  # the classic figure looks excellent


def test_reconstruction_that_keeps_the_object_beats_the_mean_frame_on_foreground():
    frames = _frames_with_square()
    m = _score(lambda x: x.clone(), frames, background=torch.zeros(1, *SHAPE))
    assert m["fg_accuracy"] == 1.0
    assert m["baseline_fg_accuracy"] == 0.0  # the mean of 4 moving squares is 0.25 grey


def test_metrics_do_not_depend_on_how_frames_are_batched():
    frames = torch.rand(7, *SHAPE)

    def recon(x: torch.Tensor) -> torch.Tensor:  # a fixed distortion: errors of many sizes
        return (x + 0.3 * torch.sin(37 * x)).clamp(0, 1)

    whole = _score(recon, frames, batch=7)
    split = _score(recon, frames, batch=2)
    assert 0 < whole["accuracy"] < 1
    for key, value in whole.items():
        assert split[key] == pytest.approx(value, rel=1e-5, nan_ok=True), key


def test_per_frame_spread_reports_median_and_fifth_percentile():
    frames = torch.full((5, *SHAPE), 0.5)
    errors = torch.tensor([0.01, 0.02, 0.03, 0.04, 0.3]).view(5, 1, 1, 1)
    m = _score(lambda x: x + errors, frames)
    frame_psnrs = sorted(10 * math.log10(1 / e**2) for e in errors.flatten().tolist())
    assert m["psnr_median"] == pytest.approx(frame_psnrs[2], abs=1e-3)
    assert m["psnr_p05"] == pytest.approx(
        frame_psnrs[0] + 0.2 * (frame_psnrs[1] - frame_psnrs[0]), abs=1e-3)


def test_reference_frames_give_mean_and_median_of_uint8_frames():
    frames = torch.stack([torch.full(SHAPE, v, dtype=torch.uint8) for v in (0, 51, 255)])
    mean_frame, background = reference_frames(frames)
    assert mean_frame.shape == background.shape == (1, *SHAPE)
    assert mean_frame.flatten()[0].item() == pytest.approx(102 / 255)
    assert background.flatten()[0].item() == pytest.approx(51 / 255)


def test_game_references_are_each_games_own_mean_and_median_in_game_order():
    breakout_like = torch.full((5, *SHAPE), 10, dtype=torch.uint8)
    breakout_like[0, :, :8, :8] = 255  # an object in one frame moves the mean, not the median
    pong_like = torch.full((4, *SHAPE), 200, dtype=torch.uint8)
    frames = torch.cat([pong_like, breakout_like])
    game_ids = torch.tensor([1] * 4 + [0] * 5)
    means, backgrounds = game_references(frames, game_ids, 2)
    assert means.shape == backgrounds.shape == (2, *SHAPE)
    assert torch.all(backgrounds[0] == 10 / 255) and torch.all(backgrounds[1] == 200 / 255)
    assert means[0, 0, 0, 0].item() == pytest.approx((4 * 10 + 255) / 5 / 255)
    assert means[0, 0, 9, 9].item() == pytest.approx(10 / 255)
    assert torch.all(means[1] == 200 / 255)
    with pytest.raises(ValueError, match="no frames of game 2"):
        game_references(frames, game_ids, 3)


def _shifted(dx: int) -> callable:
    return lambda x: torch.roll(x, shifts=dx, dims=3)


@pytest.mark.parametrize("recon, recall", [
    (lambda x: x.clone(), 1.0),
    (_shifted(1), 1.0),  # one pixel off still counts as shown at the right place
    (_shifted(3), 0.0),
    (lambda x: torch.zeros_like(x), 0.0),  # the background alone shows no object
    (lambda x: 0.5 * x, 1.0),  # a faint but visible (> 0.1) ball counts
    (lambda x: 0.05 * x, 0.0),  # one under the foreground threshold does not
])
def test_object_recall_counts_small_objects_shown_within_one_pixel(recon, recall):
    frames = _frames_with_square(n=4, size=2)
    black = torch.zeros(1, *SHAPE)  # as background and as mean frame: balls are rare anywhere
    m = _score(recon, frames, mean_frame=black, background=black)
    assert m["objects_per_frame"] == 1.0
    assert m["object_recall"] == recall
    assert m["baseline_object_recall"] == 0.0


def test_a_scorer_without_objects_gives_the_same_pixel_metrics_and_no_object_recall():
    frames = _frames_with_square(n=4, size=2)
    black = torch.zeros(1, *SHAPE)
    recon = _shifted(1)(frames)
    full, pixels_only = Scorer(), Scorer(count_objects=False)
    for scorer in (full, pixels_only):
        scorer.update(recon, frames, black, black)
    with_objects, without = full.compute(), pixels_only.compute()
    assert with_objects["object_recall"] == 1.0
    assert math.isnan(without["object_recall"]) and without["objects_per_frame"] == 0.0
    for key in ("psnr", "accuracy", "fg_psnr", "fg_accuracy", "baseline_psnr"):
        assert without[key] == with_objects[key]


def test_only_small_components_where_the_scene_is_usually_background_are_objects():
    frames = torch.zeros(2, *SHAPE)
    frames[0, :, 10:15, 10:15] = 1.0  # 25 pixels: a paddle or invader, not a ball
    frames[0, :, 40, 40] = 1.0  # one-pixel ball
    frames[1, :, 41, 41] = 1.0  # next frame's ball, diagonal to the first: a separate object
    frames[:, :, 2, 30:32] = 1.0  # a changed score digit: the mean frame shows it too
    background = torch.zeros(1, *SHAPE)
    mean_frame = torch.zeros(1, *SHAPE)
    mean_frame[:, :, 2, 30:32] = 0.6
    assert small_objects_found(frames, frames, background, mean_frame) == (2, 2)
    assert small_objects_found(frames, frames, background)[0] == 4  # without: digits count
    shown_in_first_only = frames.clone()
    shown_in_first_only[1] = 0
    assert small_objects_found(shown_in_first_only, frames, background, mean_frame) == (2, 1)
