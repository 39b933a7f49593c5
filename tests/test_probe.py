"""Linear state probes, F1, R^2 and category averaging, on data whose answers are known."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from atari_vae.envs import resolve_game
from atari_vae.model import VAE
from atari_vae.probe import (
    MAJORITY,
    ProbeSettings,
    drop_seen,
    fit_linear_probes,
    game_score,
    linear_r2,
    one_small_object,
    probe_model,
    probe_sources,
    split_episodes,
    weighted_f1,
)

FAST = ProbeSettings(lr=1e-2, batch_size=256, max_epochs=60, patience=10)


def test_split_is_by_whole_episode_seventy_ten_twenty_and_fixed_by_the_seed():
    episode_ids = np.repeat(np.arange(20), 5)
    train, val, test = split_episodes(episode_ids, seed=3)
    assert (train.astype(int) + val + test == 1).all()
    assert [np.unique(episode_ids[m]).size for m in (train, val, test)] == [14, 2, 4]
    for mask in (train, val, test):  # an episode lies wholly on one side
        assert not np.isin(episode_ids[mask], episode_ids[~mask]).any()
    again = split_episodes(episode_ids, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(again, (train, val, test), strict=True))
    with pytest.raises(ValueError, match="at least 3 episodes"):
        split_episodes(np.zeros(10, dtype=int), seed=0)


def test_test_frames_identical_to_a_probe_train_frame_are_dropped():
    frames = torch.zeros(4, 3, 64, 64, dtype=torch.uint8)
    frames[1] = 7
    frames[3] = 9
    seen = np.array([True, True, False, False])
    test = np.array([False, False, True, True])
    frames[2] = frames[1]
    assert drop_seen(test, seen, frames).tolist() == [False, False, False, True]


def test_weighted_f1_weighs_each_class_by_its_support():
    # class 0: P=2/3 R=1 F1=0.8 (support 2); class 1: P=1 R=1/2 F1=2/3 (support 2)
    assert weighted_f1(np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1])) == pytest.approx(
        (0.8 * 2 + (2 / 3) * 2) / 4)


def test_linear_r2_is_one_for_a_linear_target_and_near_zero_for_an_unrelated_one():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 3, generator=generator)
    y = torch.stack([3 * x[:, 0] - x[:, 2] + 5, torch.randn(400, generator=generator)], dim=1)
    r2 = linear_r2(x[:300], y[:300], x[300:], y[300:])
    assert r2[0] == pytest.approx(1.0, abs=1e-9)
    assert abs(float(r2[1])) < 0.1


def test_game_score_averages_within_categories_then_across_them():
    score, per_category = game_score({"ball_x": 0.2, "ball_y": 0.4, "player_x": 0.9,
                                      "score": 0.5, "angle_of_tank": 0.0})
    assert per_category == pytest.approx({"small_object_localization": 0.3,
                                          "agent_localization": 0.9,
                                          "score_clock_lives_display": 0.5})
    assert score == pytest.approx((0.3 + 0.9 + 0.5) / 3)  # uncategorised names do not count


def _decodable(n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Features that one-hot encode a 12-valued label (linearly separable) plus some noise."""
    generator = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 12, (n,), generator=generator)
    features = torch.nn.functional.one_hot(label, 12).float()
    features += 0.05 * torch.randn(n, 12, generator=generator)
    labels = np.stack([label.numpy() * 7 + 20, np.full(n, 5)], axis=1)  # byte values
    return features, labels


def test_probes_read_a_linearly_encoded_variable_and_noise_scores_like_chance():
    features, labels = _decodable(1200, seed=1)
    masks = split_episodes(np.repeat(np.arange(60), 20), seed=0)
    noise = torch.randn_like(features)
    report = probe_sources({"good": features, "noise": noise}, labels, ["ball_x", "lives"],
                           masks, FAST)
    assert report.variables == ["ball_x"] and report.dropped == ["lives"]  # constant: 0 nats
    assert report.f1["good"]["ball_x"] > 0.95
    assert report.f1["noise"]["ball_x"] < 0.3
    assert report.f1[MAJORITY]["ball_x"] < 0.2
    assert report.r2["good"]["ball_x"] > 0.9  # a byte value is linear in the one-hot code
    assert report.score["good"] == pytest.approx(report.f1["good"]["ball_x"])


def test_features_with_under_ten_rows_a_coefficient_get_f1_but_no_r2():
    features, labels = _decodable(1200, seed=1)
    wide = torch.cat([features, torch.randn(1200, 100)], dim=1)  # 112 columns, ~840 rows
    masks = split_episodes(np.repeat(np.arange(60), 20), seed=0)
    report = probe_sources({"good": features, "wide": wide}, labels, ["ball_x", "lives"],
                           masks, FAST)
    assert "good" in report.r2 and "wide" not in report.r2
    assert report.f1["wide"]["ball_x"] > 0.9  # the classifier still reads it


def test_a_ball_off_screen_counts_against_r2_on_all_frames_but_not_on_screen():
    """The RAM keeps a stale position for an off-screen ball: no encoder can read it."""
    generator = torch.Generator().manual_seed(3)
    position = torch.randint(10, 150, (1200,), generator=generator)
    features = torch.stack([position.float() / 150, torch.randn(1200, generator=generator)], 1)
    on_screen = np.arange(1200) % 3 != 0
    ram = np.where(on_screen, position.numpy(),
                   torch.randint(0, 255, (1200,), generator=generator).numpy())
    masks = split_episodes(np.repeat(np.arange(60), 20), seed=0)
    report = probe_sources({"model": features}, np.stack([ram, ram // 2], 1),
                           ["ball_x", "player_x"], masks, FAST, on_screen)
    assert report.r2["model"]["ball_x"] < 0.6
    assert report.r2_on_screen["model"] == {"ball_x": pytest.approx(1.0, abs=1e-6)}


def test_one_small_object_counts_moving_dots_and_ignores_the_fixed_paddle():
    generator = torch.Generator().manual_seed(4)
    frames = torch.zeros(60, 3, 64, 64, dtype=torch.uint8)
    frames[:, :, 60, 20:32] = 200  # a paddle in every frame: large and in the mean frame
    dots = torch.arange(60) % 3  # 0, 1 or 2 balls
    for i, n in enumerate(dots.tolist()):
        for _ in range(n):
            row, col = torch.randint(2, 50, (2,), generator=generator).tolist()
            frames[i, :, row, col:col + 2] = 255
    expected = (dots == 1).numpy()
    found = one_small_object(frames, chunk=16)
    assert (found == expected).mean() > 0.95  # two random dots may touch: one object


def test_a_probe_keeps_its_best_validation_weights():
    features, labels = _decodable(600, seed=2)
    x, y = features, torch.from_numpy(labels[:, :1])
    probes = fit_linear_probes(x[:400], y[:400], x[400:500], y[400:500], FAST)
    assert (probes.predict(x[500:]) == y[500:]).float().mean() > 0.95
    assert set(probes.predict(x).unique().tolist()) <= set(y[:400].unique().tolist())


def test_a_probe_that_never_improves_on_validation_returns_its_first_epochs_weights():
    features, labels = _decodable(600, seed=2)
    x, y = features, torch.from_numpy(labels[:, :1])
    never_predicted = torch.full_like(y[400:500], 255)  # no probe-train frame has this byte
    settings = dataclasses.replace(FAST, max_epochs=8, patience=3)
    kept = fit_linear_probes(x[:400], y[:400], x[400:500], never_predicted, settings)
    first = fit_linear_probes(x[:400], y[:400], x[400:500], never_predicted,
                              dataclasses.replace(settings, max_epochs=1))
    # Validation accuracy is 0 every epoch, so epoch 1 stays the best; the epochs after it
    # trained on (patience 3), and without the restore their weights would come back.
    assert torch.equal(kept.weight, first.weight) and torch.equal(kept.bias, first.bias)
    assert (kept.predict(x[500:]) == y[500:]).float().mean() > 0.5  # epoch 1 learnt something


def test_probe_model_on_real_breakout_frames_scores_every_source():
    torch.manual_seed(0)
    report = probe_model(VAE(latent_dim=8), resolve_game("Breakout"), 600, 80, seed=11,
                         settings=FAST)
    assert {"ball_x", "player_x"} <= set(report.variables)
    assert set(report.score) == {"model", "random_init", MAJORITY}
    assert set(report.r2["model"]) >= {"ball_x", "ball_y", "player_x"}
    # 600 frames of a random policy show exactly one ball in many of them, so the on-screen
    # fit has rows for both of the ball's coordinates.
    assert set(report.r2_on_screen["model"]) == {"ball_x", "ball_y"}
    assert all(0.0 <= f1 <= 1.0 for source in report.f1.values() for f1 in source.values())
    assert report.n_frames["train"] > report.n_frames["test"] > 0
