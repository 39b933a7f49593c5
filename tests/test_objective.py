"""One tune trial's objective and pruning: the objective aggregates games as the champion
score does, over-budget epochs rank low, the last epoch is never pruned."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest

from atari_vae import objective, tracking
from atari_vae.config import TuneConfig
from atari_vae.data import load_games, split_by_episode
from atari_vae.envs import parse_games
from atari_vae.evaluate import score_model
from atari_vae.metrics import balanced_psnr, game_references, mean_balanced_psnr, score
from tests.test_promotion import background_model
from tests.test_tune import tiny_tune_flags


def test_balanced_psnr_weighs_foreground_and_background_equally() -> None:
    fg_mse, bg_mse, share = 0.01, 0.0001, 0.02
    mse = share * fg_mse + (1 - share) * bg_mse
    assert balanced_psnr(mse, fg_mse, share) == pytest.approx(
        10 * math.log10(1 / (0.5 * (fg_mse + bg_mse))))
    # A model that paints ghosts on the background loses although its foreground is the same.
    ghosts = share * fg_mse + (1 - share) * 0.01
    assert balanced_psnr(ghosts, fg_mse, share) < balanced_psnr(mse, fg_mse, share)


def test_two_game_objective_is_the_mean_of_each_games_balanced_psnr() -> None:
    # The champion is chosen with mean_balanced_psnr of per-game metrics; the objective must be
    # that same number, not balanced PSNR of both games pooled (Pong's frames outnumber).
    frames = load_games(parse_games("Breakout,Pong"), 3, 60, 42)
    train_set, val_set = split_by_episode(frames, 0.34, 42)
    refs = game_references(train_set.frames_uint8, train_set.game_ids, 2)
    model = background_model()
    value = objective.validation_value(model, val_set, refs)
    per_game = [score_model(model, val_set.for_game(g).frames_uint8, refs.means[i:i + 1],
                            refs.backgrounds[i:i + 1])[0] for i, g in enumerate(val_set.games)]
    singles = [balanced_psnr(m["mse"], m["fg_mse"], m["fg_fraction"]) for m in per_game]
    assert value == pytest.approx(mean_balanced_psnr(per_game)) == pytest.approx(sum(singles) / 2)
    pooled = score(lambda x: model(x)[0], [
        (val_set.subset(val_set.game_ids == i).frames_uint8.float() / 255, refs.means[i:i + 1],
         refs.backgrounds[i:i + 1]) for i in range(2)])
    assert value != pytest.approx(balanced_psnr(pooled["mse"], pooled["fg_mse"],
                                                pooled["fg_fraction"]), abs=1e-3)


def test_over_budget_epochs_rank_below_every_feasible_one() -> None:
    assert objective.pruning_value(12.0, kl=40.0, budget=50.0) == 12.0
    assert objective.pruning_value(30.0, kl=51.0, budget=50.0) < \
        objective.pruning_value(0.5, 50.0, 50.0)
    assert objective.pruning_value(30.0, kl=60.0, budget=50.0) < \
        objective.pruning_value(30.0, 51.0, 50.0)


def test_epoch_hook_prunes_below_the_median_but_never_at_the_last_epoch(tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(
        n_startup_trials=1, n_warmup_steps=0))
    first = study.ask()
    for epoch in (1, 2):
        first.report(20.0, epoch)
    study.tell(first, 20.0)
    cfg = TuneConfig(**tiny_tune_flags(tmp_path, epochs=2))
    poor = {"val_psnr": 20.0, "val_fg_psnr": 5.0, "val_kl": 3.0, "val_loss": 1.0}
    tracking.configure(cfg.experiment_name)
    with tracking.tracked_run("hook"):
        hooks = objective.TrialHooks(study.ask(), cfg, fg_fraction=0.01)
        with pytest.raises(optuna.TrialPruned):
            hooks.on_epoch_end(1, poor)
        last = objective.TrialHooks(study.ask(), cfg, fg_fraction=0.01)
        last.on_epoch_end(2, poor)  # the last epoch: finishing costs nothing more than pruning
    assert study.trials[1].intermediate_values[1] < 20.0


def test_trial_config_takes_the_trials_params_and_its_own_output_dir(tmp_path: Path) -> None:
    cfg = TuneConfig(**tiny_tune_flags(tmp_path))
    trial = objective.trial_config(cfg, 7, kl_weight=0.25, latent_dim=16)
    assert (trial.kl_weight, trial.latent_dim) == (0.25, 16)
    assert trial.output_dir == str(tmp_path / "trial_7") and not trial.resume
    assert trial.fg_weight == cfg.fg_weight and trial.epochs == cfg.epochs
