"""The loss on hand-made tensors whose value is known."""

from __future__ import annotations

import math

import pytest
import torch

from atari_vae.losses import (
    MIN_FOURIER_SCALE,
    OBJECT_SCALES_PX,
    coordinate_error,
    foreground_mask,
    foreground_rate,
    fourier_code,
    fourier_error,
    kl_per_dim,
    locator_error,
    mask_error,
    object_error,
    pixel_weights,
    small_objects,
    usually_empty,
    vae_loss,
)

PIXELS = 3 * 64 * 64


def _images(n: int = 2, value: float = 0.5) -> torch.Tensor:
    return torch.full((n, 3, 64, 64), value)


def test_perfect_reconstruction_with_standard_normal_posterior_costs_nothing():
    x = _images()
    terms = vae_loss(x.clone(), x, torch.zeros(2, 8), torch.zeros(2, 8))
    assert terms.total.item() == terms.recon.item() == terms.kl.item() == 0.0


def test_reconstruction_is_a_per_image_sum_of_squares_averaged_over_the_batch():
    x = _images()
    x_hat = x + 0.1
    x_hat[1] = x[1]  # second image perfect: the batch mean halves the first image's sum
    terms = vae_loss(x_hat, x, torch.zeros(2, 4), torch.zeros(2, 4))
    assert terms.recon.item() == pytest.approx(PIXELS * 0.01 / 2, rel=1e-5)


def test_kl_matches_the_closed_form_on_a_hand_example():
    mu = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    # KL_j = -0.5 (1 + logvar - mu^2 - exp(logvar)): image 1 -> 0.5 and 0.5 (1 - ln 2); image 2 -> 0
    expected = (0.5 + 0.5 * (1 - math.log(2.0))) / 2
    assert kl_per_dim(mu, logvar).tolist() == pytest.approx([0.25, 0.25 * (1 - math.log(2.0))])
    x = _images()
    terms = vae_loss(x, x, mu, logvar, kl_weight=3.0)
    assert terms.kl.item() == pytest.approx(expected)
    assert terms.total.item() == pytest.approx(3.0 * expected)


def test_kl_weight_scales_only_the_kl_term():
    x = _images()
    args = (x + 0.2, x, torch.ones(2, 4), torch.zeros(2, 4))
    one, ten = vae_loss(*args, kl_weight=1.0), vae_loss(*args, kl_weight=10.0)
    assert one.recon == ten.recon and one.kl == ten.kl
    assert (ten.total - ten.recon).item() == pytest.approx(10 * (one.total - one.recon).item())
    assert vae_loss(*args, kl_weight=0.0).total == one.recon


def test_foreground_mask_marks_pixels_off_the_background_in_any_channel():
    background = _images(1, 0.5)
    x = background.expand(1, -1, -1, -1).clone()
    x[0, 2, 10, 20] = 0.7  # blue channel only, off by 0.2
    x[0, 0, 30, 30] = 0.55  # within the 0.1 threshold: background
    mask = foreground_mask(x, background)
    assert mask.shape == (1, 1, 64, 64)
    assert mask.sum().item() == 1 and mask[0, 0, 10, 20]


def test_foreground_weight_multiplies_the_error_on_foreground_pixels_only():
    background = _images(1, 0.5)
    x = background.clone()
    x[0, :, 5, 5] = 1.0  # one object pixel
    weights = pixel_weights(x, background, fg_weight=30.0)
    assert weights[0, 0, 5, 5] == 30.0 and weights.sum().item() == 64 * 64 - 1 + 30
    mu = logvar = torch.zeros(1, 4)
    on_object = x.clone()
    on_object[0, 0, 5, 5] -= 0.1
    on_background = x.clone()
    on_background[0, 0, 40, 40] -= 0.1
    cost_fg = vae_loss(on_object, x, mu, logvar, weights).recon.item()
    cost_bg = vae_loss(on_background, x, mu, logvar, weights).recon.item()
    assert cost_bg == pytest.approx(0.01, rel=1e-4)
    assert cost_fg == pytest.approx(30 * 0.01, rel=1e-4)


def test_fg_weight_one_gives_the_plain_sum_of_squares():
    background = _images(1, 0.0)
    x = torch.rand(2, 3, 64, 64)
    x_hat = torch.rand(2, 3, 64, 64)
    mu, logvar = torch.randn(2, 4), torch.randn(2, 4)
    plain = vae_loss(x_hat, x, mu, logvar)
    weighted = vae_loss(x_hat, x, mu, logvar, pixel_weights(x, background, 1.0))
    assert torch.allclose(plain.total, weighted.total)


def test_free_bits_charge_at_least_the_floor_per_dim_and_stop_its_gradient():
    x = _images(1)
    mu = torch.tensor([[0.0, 0.0, 3.0]], requires_grad=True)
    logvar = torch.zeros(1, 3)
    terms = vae_loss(x, x, mu, logvar, kl_weight=2.0, free_bits=0.5)
    # dims 1-2 have KL 0 -> charged 0.5 each; dim 3 has KL 4.5 > 0.5 -> charged 4.5
    assert terms.kl.item() == pytest.approx(4.5)  # reported KL is the true KL
    assert terms.total.item() == pytest.approx(2.0 * (0.5 + 0.5 + 4.5))
    terms.total.backward()
    assert mu.grad[0, :2].tolist() == [0.0, 0.0] and mu.grad[0, 2].item() == pytest.approx(6.0)


def test_loss_of_bf16_reconstructions_is_computed_in_float32():
    x = _images()
    x_hat, mu, logvar = (x + 0.1).bfloat16(), torch.zeros(2, 4).bfloat16(), \
        torch.zeros(2, 4).bfloat16()
    terms = vae_loss(x_hat, x, mu, logvar)
    assert terms.total.dtype == torch.float32
    # The same bf16 values summed in float32: a sum taken in bf16 and cast at the end would
    # be off by about a percent (8 mantissa bits) over these thousands of pixels.
    exact = vae_loss(x_hat.float(), x, mu.float(), logvar.float()).total
    assert terms.total.item() == pytest.approx(exact.item(), rel=1e-5)


def test_objects_painted_by_the_reconstruction_are_weighted_like_real_ones():
    background = _images(1, 0.5)
    x = background.clone()
    x_hat = x.clone()
    x_hat[0, :, 7, 9] = 1.0  # a ghost object where the frame shows background
    weights = pixel_weights(x, background, 30.0, x_hat)
    assert weights[0, 0, 7, 9] == 30.0 and weights.sum().item() == 64 * 64 - 1 + 30
    assert pixel_weights(x, background, 30.0).eq(1.0).all()


def _one_dot(row: int, col: int, value: float = 0.6) -> torch.Tensor:
    """A black (1, 3, 64, 64) frame with a one-pixel 'ball' at (row, col)."""
    frame = torch.zeros(1, 3, 64, 64)
    frame[0, :, row, col] = value
    return frame


def test_object_error_charges_a_near_miss_less_than_a_missing_ball():
    background = torch.zeros(1, 3, 64, 64)
    region = usually_empty(background, background)
    target = _one_dot(30, 30)
    near_miss, missing = _one_dot(30, 31), background.clone()
    assert (object_error(near_miss, target, background, region)
            < 0.7 * object_error(missing, target, background, region))
    # The plain squared error says the opposite: a near miss is a miss plus a false ball.
    assert (near_miss - target).pow(2).sum() > (missing - target).pow(2).sum()
    assert object_error(target, target, background, region).item() == 0.0


def test_object_error_of_one_missing_pixel_is_about_its_squared_error_per_scale():
    background = torch.zeros(1, 3, 64, 64)
    region = usually_empty(background, background)
    error = object_error(background, _one_dot(30, 30, 0.5), background, region).item()
    assert error == pytest.approx(len(OBJECT_SCALES_PX) * 0.25, rel=0.1)


def test_object_error_ignores_pixels_that_are_usually_not_background():
    background = torch.zeros(1, 3, 64, 64)
    mean_frame = background.clone()
    mean_frame[0, :, 28:33, 28:33] = 0.3  # e.g. where bricks or the score usually are
    region = usually_empty(mean_frame, background)
    assert object_error(background, _one_dot(30, 30), background, region).item() == 0.0
    assert object_error(background, _one_dot(10, 10), background, region).item() > 0.0


def test_the_ball_terms_add_to_the_reconstruction_term_per_image():
    x = _images()
    terms = vae_loss(x, x, torch.zeros(2, 4), torch.zeros(2, 4),
                     extra_recon=torch.tensor([2.0, 4.0]))
    assert terms.recon.item() == pytest.approx(3.0)


def test_object_error_leaves_large_objects_and_ball_free_frames_to_the_pixel_term():
    background = torch.zeros(1, 3, 64, 64)
    region = usually_empty(background, background)
    paddle = background.clone()
    paddle[0, :, 60, 20:27] = 0.8
    assert object_error(background, paddle, background, region).item() == 0.0
    # A ball drawn where the frame has none is the pixel term's business, not this one's.
    assert object_error(_one_dot(30, 30), background, background, region).item() == 0.0


def test_locator_error_is_low_for_the_right_place_uniform_for_no_idea_and_zero_without_ball():
    background = torch.zeros(1, 3, 64, 64)
    region = usually_empty(background, background)
    ball = _one_dot(30, 40)
    uniform = torch.zeros(1, 64 * 64)
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")

    def bump(row: int, col: int) -> torch.Tensor:  # a guess with ~1 px of doubt
        return (-((rows - row) ** 2 + (cols - col) ** 2) / 2).reshape(1, -1)

    right, wrong = bump(30, 40), bump(10, 5)
    small = small_objects(ball, background, region)[0]
    assert locator_error(uniform, small).item() == pytest.approx(math.log(64 * 64), rel=1e-4)
    assert locator_error(right, small) < locator_error(uniform, small) < locator_error(wrong, small)
    no_ball = small_objects(background, background, region)[0]
    assert locator_error(right, no_ball).item() == 0.0


def test_small_objects_drop_a_shot_within_the_crowding_reach_of_an_invader_and_keep_it_beyond():
    background = torch.zeros(1, 3, 64, 64)
    region = torch.ones(1, 1, 64, 64)
    frame = background.clone()
    frame[0, :, 20:23, 20:23] = 0.6  # a 3x3 invader: every pixel crowded
    frame[0, :, 21, 24] = 0.6  # a shot two columns from its edge
    frame[0, :, 40, 10:16] = 0.6  # a paddle: its two outer pixels at each end are not crowded
    assert torch.equal(small_objects(frame, background, region)[0],
                       small_objects(frame, background, region, crowd_reach_px=2)[0])
    for reach, shot_kept, paddle_end_kept in ((2, False, False), (1, True, True),
                                              (0, True, True)):
        small = small_objects(frame, background, region, crowd_reach_px=reach)[0][0, 0]
        assert bool(small[21, 24]) is shot_kept, reach
        assert bool(small[40, 10]) is paddle_end_kept, reach
        assert small[20:23, 20:23].sum().item() == 0.0  # the invader never


def test_coordinate_error_is_a_gaussian_likelihood_of_the_one_ball_in_view():
    background = torch.zeros(1, 3, 64, 64)
    region = usually_empty(background, background)
    ball = _one_dot(30, 40)
    ball[..., 30, 41] = 1.0  # a 1x2 ball: its centre is (30, 40.5)
    guess = torch.tensor([[33.0, 36.5]], requires_grad=True)
    log_px = torch.tensor(math.log(2.0), requires_grad=True)
    small = small_objects(ball, background, region)[0]
    error = coordinate_error(guess, log_px, small)
    assert error.item() == pytest.approx((3.0**2 + 4.0**2) / (2 * 2.0**2) + 2 * math.log(2.0))
    error.sum().backward()
    assert guess.grad[0].tolist() == pytest.approx([3.0 / 4, -4.0 / 4])  # d / s^2
    # the scale that fits a miss of 5 px best is 5 / sqrt(2) px: a good guess earns a tighter one
    scales = torch.linspace(1.0, 8.0, 141)
    costs = [coordinate_error(guess.detach(), s.log(), small) for s in scales]
    assert scales[int(torch.stack(costs).argmin())].item() == pytest.approx(5 / 2**0.5, abs=0.05)


def test_coordinate_error_asks_nothing_without_a_ball_or_with_two():
    background = torch.zeros(1, 3, 64, 64)
    region = usually_empty(background, background)
    two = _one_dot(10, 10) + _one_dot(50, 50)
    frames = torch.cat([background, two])
    small = small_objects(frames, background, region)[0]
    guess = torch.full((2, 2), 20.0)
    assert coordinate_error(guess, torch.tensor(0.0), small).tolist() == [0.0, 0.0]


def test_fourier_code_gives_cos_then_sin_of_each_axis_at_each_period():
    periods = torch.tensor([64.0, 4.0])
    code = fourier_code(torch.tensor([[16.0, 1.0]]), periods)
    # (row cos at 64, 4; row sin at 64, 4; col cos ...; col sin ...)
    expected = [0.0, 1.0, 1.0, 0.0,
                math.cos(2 * math.pi / 64), 0.0, math.sin(2 * math.pi / 64), 1.0]
    assert code[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_fourier_error_reads_the_ball_between_pixels_from_its_intensity():
    background = torch.zeros(1, 3, 64, 64)
    region = usually_empty(background, background)
    ball = _one_dot(30, 40, 1.0)
    ball[..., 30, 41] = 0.5  # a bright and a faint pixel: the ball sits a third of the way over
    small = small_objects(ball, background, region)[0]
    periods = torch.tensor([64.0, 25.4, 10.1, 4.0])
    at = fourier_code(torch.tensor([[30.0, 40.0 + 1 / 3]]), periods)
    log_scale = torch.tensor(math.log(0.5))
    right = fourier_error(at, log_scale, small, ball, background, periods)
    # no error term left: only the scale's 16 log(0.5 / floor) nats
    assert right.item() == pytest.approx(16 * math.log(0.5 / MIN_FOURIER_SCALE), abs=1e-4)
    # the binary mask's centre (40.5) is a sixth of a pixel off: it costs, most at 4 px
    half_way = fourier_error(fourier_code(torch.tensor([[30.0, 40.5]]), periods), log_scale,
                             small, ball, background, periods)
    assert half_way.item() > right.item() + 0.1
    at_floor = fourier_error(at, torch.tensor(math.log(MIN_FOURIER_SCALE)), small, ball,
                             background, periods)
    assert at_floor.item() == pytest.approx(0.0, abs=1e-4)  # never below 0


def test_fourier_error_asks_nothing_without_a_ball_or_with_two():
    background = torch.zeros(1, 3, 64, 64)
    region = usually_empty(background, background)
    frames = torch.cat([background, _one_dot(10, 10) + _one_dot(50, 50)])
    small = small_objects(frames, background, region)[0]
    periods = torch.tensor([64.0, 4.0])
    waves = torch.ones(2, 8)
    assert fourier_error(waves, torch.tensor(0.0), small, frames, background,
                         periods).tolist() == [0, 0]


def test_mask_error_is_the_summed_binary_cross_entropy_of_the_frame_s_foreground():
    background = torch.zeros(1, 3, 64, 64)
    ball = _one_dot(30, 40)
    sure_right = torch.full((1, 64 * 64), -20.0)
    sure_right[0, 30 * 64 + 40] = 20.0
    assert mask_error(sure_right, ball, background).item() == pytest.approx(0.0, abs=1e-6)
    # no idea anywhere: log 2 nats a pixel
    assert mask_error(torch.zeros(1, 64 * 64), ball, background).item() == pytest.approx(
        64 * 64 * math.log(2), rel=1e-5)
    # one pixel wrong with certainty costs its ~20 nats, whichever way it is wrong
    assert mask_error(sure_right, background, background).item() == pytest.approx(20.0, rel=1e-3)


def test_foreground_rate_is_the_share_of_frames_each_pixel_is_foreground():
    background = torch.zeros(1, 3, 64, 64)
    frames = torch.zeros(4, 3, 64, 64, dtype=torch.uint8)
    frames[:3, 0, 5, 6] = 255  # foreground in three of four frames
    frames[0, 2, 7, 7] = 20  # 0.08 off the background: under the threshold
    rate = foreground_rate(frames, background, torch.zeros(4, dtype=torch.int64))
    assert rate.shape == (1, 1, 64, 64) and rate[0, 0, 5, 6].item() == 0.75
    assert rate.sum().item() == 0.75
    # each frame against its own game's background: in game 1 that pixel is lit backdrop, so
    # only the frame where it is dark differs there
    lit = background.clone()
    lit[0, 0, 5, 6] = 1.0
    rate = foreground_rate(frames, torch.cat([background, lit]), torch.ones(4, dtype=torch.int64))
    assert rate[0, 0, 5, 6].item() == 0.25 and rate.sum().item() == 0.25


def test_a_foreground_mask_passed_in_gives_what_each_term_computes_itself():
    torch.manual_seed(0)
    background = torch.zeros(1, 3, 64, 64)
    x = (torch.rand(4, 3, 64, 64) > 0.98).float()  # scattered foreground pixels
    x_hat = torch.rand(4, 3, 64, 64) * 0.2
    fg = foreground_mask(x, background)
    region = torch.ones(1, 1, 64, 64)
    logits = torch.randn(4, 64 * 64)
    assert torch.equal(pixel_weights(x, background, 30.0, x_hat, fg),
                       pixel_weights(x, background, 30.0, x_hat))
    for passed, own in zip(small_objects(x, background, region, fg),
                           small_objects(x, background, region)):
        assert torch.equal(passed, own)
    assert torch.equal(mask_error(logits, x, background, fg), mask_error(logits, x, background))
    # and a different mask really is used: the terms are not computed from x regardless
    assert not torch.equal(mask_error(logits, x, background, ~fg),
                           mask_error(logits, x, background))
