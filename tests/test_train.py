"""`atari-vae train` end to end: real ALE frames, a tiny model, a real SQLite MLflow store."""

from __future__ import annotations

import math
import os
import resource
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

import atari_vae
from atari_vae import cli, registry
from atari_vae.config import TrainConfig
from atari_vae.data import load_games, split_by_episode
from atari_vae.envs import parse_games, to_float
from atari_vae.jobs import RUN_ID_FILE
from atari_vae.losses import foreground_mask, small_objects, usually_empty
from atari_vae.metrics import game_references, psnr_from_mse, reference_frames
from atari_vae.model import vae_for
from atari_vae.objective import foreground_fraction
from atari_vae.rundir import LOCK_FILE, RUN_TOKEN_FILE
from atari_vae.train import fit
from tests.conftest import REPO, tiny_train_flags

EPOCHS, CHECKPOINT_FREQ = 3, 2
EPOCH_METRICS = ("train/loss", "val/loss", "train/recon", "val/recon", "train/kl", "val/kl",
                 "val/psnr", "val/accuracy")


@dataclass
class TrainedRun:
    out: Path
    uri: str
    run: Run
    flags: dict[str, object]
    stderr: str


def cli_args(flags: dict[str, object]) -> list[str]:
    """``--key value`` pairs for a flags dict (booleans as bare switches)."""
    args = []
    for key, value in flags.items():
        if value is True:
            args.append(f"--{key}")
        elif value is not False:
            args += [f"--{key}", str(value)]
    return args


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, frame_cache: Path) -> TrainedRun:
    """One real run of the installed `atari-vae train` command, shared by this module."""
    root = tmp_path_factory.mktemp("train-e2e")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    flags = tiny_train_flags(root / "out", epochs=EPOCHS, checkpoint_freq=CHECKPOINT_FREQ,
                             env_name="ALE/Breakout-v5")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "ATARI_VAE_CACHE_DIR": str(frame_cache)}
    env.pop("MLFLOW_RUN_ID", None)
    exe = Path(sys.executable).with_name("atari-vae")
    result = subprocess.run([str(exe), "train", *cli_args(flags)], cwd=root, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = (root / "out" / RUN_ID_FILE).read_text().strip()
    return TrainedRun(root / "out", uri, MlflowClient(uri).get_run(run_id), flags, result.stderr)


def test_every_output_file_is_written(trained):
    names = {p.name for p in trained.out.iterdir()}
    expected = {"best_model.pt", "final_model.pt", "checkpoint_epoch_2.pt",
                "checkpoint_epoch_3.pt", "training_curves.png", "reconstructions_epoch_2.png",
                "reconstructions_epoch_3.png", "final_reconstructions.png", RUN_ID_FILE,
                RUN_TOKEN_FILE, LOCK_FILE}
    assert names == expected  # also: no checkpoint for epoch 1, no leftover temp files
    for name in names - {RUN_ID_FILE, RUN_TOKEN_FILE, LOCK_FILE}:
        head = (trained.out / name).read_bytes()[:8]
        assert head.startswith(b"\x89PNG" if name.endswith(".png") else b"PK"), name
    # the last checkpoint drew the final model: copied, not drawn again
    assert (trained.out / "final_reconstructions.png").read_bytes() == \
        (trained.out / "reconstructions_epoch_3.png").read_bytes()


def test_best_and_final_models_load_as_plain_state_dicts_into_the_documented_vae(trained):
    for name in ("best_model.pt", "final_model.pt"):
        state = torch.load(trained.out / name, weights_only=True)
        vae = vae_for(state)
        vae.load_state_dict(state)
        assert vae.latent_dim == 8 and vae.locator is not None  # --loc_weight 30 by default
        assert vae.coords is None  # --coord_weight 0 by default
        x_hat, mu, _ = vae.eval()(atari_vae.preprocess(torch.zeros(210, 160, 3,
                                                                   dtype=torch.uint8)))
        assert x_hat.shape == (1, 3, 64, 64) and mu.shape == (1, 8)


def test_checkpoint_holds_full_training_state_and_loads_with_weights_only(trained):
    ckpt = torch.load(trained.out / "checkpoint_epoch_3.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "torch_rng", "order_rng",
            "config", "history"} <= set(ckpt)
    assert ckpt["epoch"] == EPOCHS
    assert ckpt["config"] == asdict(TrainConfig(**trained.flags))
    assert ckpt["optimizer"]["state"], "Adam moments must be saved to resume exactly"
    assert [h["epoch"] for h in ckpt["history"]] == [1, 2, 3]
    final = torch.load(trained.out / "final_model.pt", weights_only=True)
    assert all(torch.equal(final[k], v) for k, v in ckpt["model"].items())
    early = torch.load(trained.out / "checkpoint_epoch_2.pt", weights_only=True)
    assert early["epoch"] == 2
    assert not torch.equal(early["model"]["to_mu.weight"], ckpt["model"]["to_mu.weight"])


def test_best_model_is_the_epoch_with_the_lowest_validation_loss(trained):
    ckpt = torch.load(trained.out / "checkpoint_epoch_3.pt", weights_only=True)
    val_losses = [h["val_loss"] for h in ckpt["history"]]
    assert ckpt["best_epoch"] == 1 + val_losses.index(min(val_losses))
    best = torch.load(trained.out / "best_model.pt", weights_only=True)
    for epoch in (2, 3):  # the checkpointed epochs: best_model.pt is the best one's, no other's
        at_epoch = torch.load(trained.out / f"checkpoint_epoch_{epoch}.pt",
                              weights_only=True)["model"]
        same = all(torch.equal(best[k], v) for k, v in at_epoch.items())
        assert same == (epoch == ckpt["best_epoch"]), epoch


def test_mlflow_run_finished_with_every_flag_as_a_param(trained):
    assert trained.run.info.status == "FINISHED"
    expected = {k: str(v) for k, v in asdict(TrainConfig(**trained.flags)).items()}
    assert trained.run.data.params == expected


def test_mlflow_run_has_one_value_per_epoch_for_each_loss_and_quality_metric(trained):
    client = MlflowClient(trained.uri)
    for key in EPOCH_METRICS:
        history = client.get_metric_history(trained.run.info.run_id, key)
        assert [m.step for m in history] == list(range(1, EPOCHS + 1)), key
    final = trained.run.data.metrics
    assert {"val_best/psnr", "val_best/accuracy", "val_best/baseline_psnr",
            "val_best/fg_accuracy", "val_best/baseline_fg_accuracy"} <= set(final)
    assert 0.0 <= final["val_best/accuracy"] <= 1.0 and final["val_best/psnr"] > 10


def test_mlflow_run_is_tagged_with_game_version_and_commit(trained):
    tags = trained.run.data.tags
    assert tags["game"] == "Breakout" and tags["job"] == "train"
    assert tags["atari_vae_version"] == atari_vae.__version__
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()
    assert tags["git_commit"] == head


def test_mlflow_run_holds_the_images_and_a_model_equal_to_best_model(trained, monkeypatch):
    client = MlflowClient(trained.uri)
    run_id = trained.run.info.run_id
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"training_curves.png", "final_reconstructions.png", "best_model.pt"} <= top
    per_checkpoint = {a.path for a in client.list_artifacts(run_id, "reconstructions")}
    assert per_checkpoint == {"reconstructions/reconstructions_epoch_2.png",
                              "reconstructions/reconstructions_epoch_3.png"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained.uri)
    logged = registry.load_model(f"runs:/{run_id}/breakout")
    best = torch.load(trained.out / "best_model.pt", weights_only=True)
    assert all(torch.equal(v, best[k]) for k, v in logged.state_dict().items())


def test_progress_is_logged_per_epoch_when_not_on_a_terminal(trained):
    for epoch in range(1, EPOCHS + 1):
        assert f"epoch {epoch}/{EPOCHS}" in trained.stderr


def test_original_training_script_trains_and_logs_a_finished_run(tmp_path):
    flags = tiny_train_flags(tmp_path / "out", epochs=1)
    result = subprocess.run([sys.executable, str(REPO / "experiments" / "train_atari_vae.py"),
                             *cli_args(flags)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "final_model.pt").is_file()
    run_id = (tmp_path / "out" / RUN_ID_FILE).read_text().strip()
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"


def test_nan_loss_stops_with_a_clear_error_and_the_run_ends_failed(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli.train, cli_args(tiny_train_flags(out, lr=1e30)))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    last = result.stderr.strip().splitlines()[-1]  # MLflow's own INFO lines may precede it
    assert last.startswith("Error: train_loss became nan at epoch 1") and "--lr" in last
    assert result.stderr.count("Error:") == 1 and "Traceback" not in result.output
    run = MlflowClient().get_run((out / RUN_ID_FILE).read_text().strip())
    assert run.info.status == "FAILED"
    assert not list(out.glob("*.pt")), "no model saved from a diverged run"


def _file_size_limit(limit_bytes: int):
    def apply() -> None:  # in the child: writes past the limit fail with EFBIG, like a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def test_a_full_disk_gives_one_line_naming_the_file_and_the_run_ends_failed(tmp_path):
    # 8 MB holds the store and best_model.pt (~6 MB at --base_channels 32) but not a
    # checkpoint with Adam's state.
    out = tmp_path / "out"
    flags = tiny_train_flags(out, epochs=1, base_channels=32)
    result = subprocess.run([str(Path(sys.executable).with_name("atari-vae")), "train",
                             *cli_args(flags)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600,
                            preexec_fn=_file_size_limit(8_000_000))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    checkpoint = out / "checkpoint_epoch_1.pt"
    assert last.startswith(f"Error: could not write {checkpoint}: File too large")
    assert not checkpoint.exists()
    assert [p.name for p in out.glob(".*")] == [LOCK_FILE], "no temporary left behind"
    run = MlflowClient().get_run((out / RUN_ID_FILE).read_text().strip())
    assert run.info.status == "FAILED"


def test_a_multi_game_run_weighs_and_scores_each_frame_against_its_own_games_references(
        tmp_path):
    cfg = TrainConfig(**tiny_train_flags(tmp_path / "out", env_name="Breakout,Pong", epochs=1))
    frames = load_games(parse_games(cfg.env_name), cfg.num_episodes, cfg.max_steps, cfg.seed)
    train_set, val_set = split_by_episode(frames, cfg.val_split, cfg.seed)
    result = fit(cfg, train_set, val_set)

    val_frames = to_float(val_set.frames_uint8[:])
    refs = game_references(train_set.frames_uint8, train_set.game_ids, len(train_set.games))
    means, backgrounds = refs
    own_fraction = foreground_mask(val_frames, backgrounds[val_set.game_ids]).float().mean()
    assert result.val_metrics["fg_fraction"] == pytest.approx(own_fraction.item(), rel=1e-6)
    assert foreground_fraction(refs, val_set) == pytest.approx(own_fraction.item(), rel=1e-6)
    # One median over both games would call most of one game's backdrop foreground.
    mixed_mean, mixed_background = reference_frames(train_set.frames_uint8)
    assert foreground_mask(val_frames, mixed_background).float().mean() > 2 * own_fraction
    # The baseline is "output your game's mean frame", not one mean over both games.
    own_mse = (val_frames - means[val_set.game_ids]).pow(2).mean().item()
    assert result.val_metrics["baseline_psnr"] == pytest.approx(psnr_from_mse(own_mse), abs=1e-3)
    assert psnr_from_mse((val_frames - mixed_mean).pow(2).mean().item()) < psnr_from_mse(own_mse)


def test_the_ball_terms_train_a_broadcast_model_with_its_heads_that_loads_back(tmp_path):
    cfg = TrainConfig(**tiny_train_flags(tmp_path / "out", checkpoint_freq=1000,
                                         decoder="broadcast", obj_weight=3.0, loc_weight=1.0,
                                         coord_weight=1.0, fourier_weight=1.0,
                                         mask_weight=1.0))
    frames = load_games(parse_games(cfg.env_name), cfg.num_episodes, cfg.max_steps, cfg.seed)
    result = fit(cfg, *split_by_episode(frames, cfg.val_split, cfg.seed))
    assert all(math.isfinite(epoch["train_loss"]) for epoch in result.history)
    model = registry.load_state_file(tmp_path / "out" / "best_model.pt")
    assert model.decoder_kind == "broadcast" and model.locator is not None
    assert model.coords is not None and model.mask is not None and model.fourier is not None


def test_object_oversample_weighs_the_frames_that_show_the_ball(tmp_path):
    from atari_vae.train import _object_weights

    cfg = TrainConfig(**tiny_train_flags(tmp_path / "out", object_oversample=3.0))
    frames = load_games(parse_games(cfg.env_name), cfg.num_episodes, cfg.max_steps, cfg.seed)
    refs = game_references(frames.frames_uint8, frames.game_ids, 1)
    weights = _object_weights(frames.frames_uint8, frames.game_ids, refs, 3.0)
    assert set(weights.unique().tolist()) == {1.0, 3.0}  # random play: the ball in some frames
    # a frame weighed 3 shows a small object the loss's own mask finds; one weighed 1 none
    mean_frame, background = refs
    x = to_float(frames.frames_uint8[:])
    small, _ = small_objects(x, background, usually_empty(mean_frame, background))
    assert torch.equal(weights == 3.0, small.flatten(1).amax(1) > 0)


@pytest.mark.parametrize("oversample", [1.0, 3.0])
def test_each_pass_draws_its_order_with_the_object_weights_only_when_oversampling(
        tmp_path, monkeypatch, oversample):
    from atari_vae import train as loop

    given, real = [], loop.balanced_order

    def spy(game_ids, generator, weights=None):
        given.append(weights)
        return real(game_ids, generator, weights)

    monkeypatch.setattr(loop, "balanced_order", spy)
    cfg = TrainConfig(**tiny_train_flags(tmp_path / "out", object_oversample=oversample))
    frames = load_games(parse_games(cfg.env_name), cfg.num_episodes, cfg.max_steps, cfg.seed)
    train_set, val_set = split_by_episode(frames, cfg.val_split, cfg.seed)
    result = fit(cfg, train_set, val_set)
    assert len(given) == cfg.epochs and all(math.isfinite(e["train_loss"]) for e in result.history)
    if oversample == 1.0:
        assert all(weights is None for weights in given)  # the plain permutation, as before
    else:
        assert all(len(w) == len(train_set) and set(w.unique().tolist()) == {1.0, 3.0}
                   for w in given)


@pytest.mark.parametrize("weight_decay", [0.0, 0.5])
def test_weight_decay_shrinks_the_weights_by_lr_times_it_and_never_a_bias(weight_decay):
    from atari_vae.train import _optimizer
    from atari_vae.train_step import build_model

    cfg = TrainConfig(latent_dim=8, lr=0.1, weight_decay=weight_decay)
    model = build_model(cfg)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's own step is zero: only the decay moves a weight
    _optimizer(model, cfg, torch.device("cpu")).step()
    for name, p in model.named_parameters():
        shrink = 1 - 0.1 * weight_decay if name.endswith(".weight") else 1.0
        torch.testing.assert_close(p.detach(), before[name] * shrink, msg=name)
