"""One dataclass per job: the single source of defaults for the CLI, the MLproject and the scripts.

Each field carries its help text in ``metadata["help"]``; ``cli.py`` turns fields into click
options and ``mlproject.py`` turns them into MLproject parameters, so the three cannot drift.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from atari_vae import flag_checks as check
from atari_vae.errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
DECODERS = ("deconv", "broadcast")
PRECISION_CHOICES = ("auto", "fp32", "bf16")
CUDA_GRAPH_CHOICES = ("auto", "off")
# The quality floor (README "The champion"): a version becomes champion only if, on the
# selection frames of every game, its PSNR beats the mean frame's by this many dB AND its
# fg_accuracy beats the mean frame's by this much (absolute). fg_accuracy is the real test: the
# recipe without foreground weighting (+1.3 dB but +0.095 on Breakout) fails, the quick test's
# model (+1.53 dB, +0.34 on the 1000 selection frames) passes.
FLOOR_PSNR_MARGIN_DB = 0.3
FLOOR_FG_ACCURACY_MARGIN = 0.15
# Seed of the episodes a champion is chosen on: apart from evaluate's default (10000) and its
# reference episodes (+100000), so the figure `evaluate` reports is not the one selected on.
SELECTION_SEED = 20_000


def flag(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
         cli_only: bool = False) -> Any:
    """A config field with its help text (and, optionally, allowed values)."""
    meta = {"help": help, "choices": choices, "cli_only": cli_only}
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    """Which frames to collect: random-policy episodes of one or more ALE games."""

    env_name: str = flag(
        "Breakout",
        "Game: short name in any case (Breakout, space_invaders) or id (ALE/Breakout-v5); "
        "comma-separated for a balanced multi-game mix.")
    num_episodes: int = flag(300, "Random-policy episodes to collect per game.")
    max_steps: int = flag(1000, "Longest episode kept, in agent steps (frameskip 4).")
    seed: int = flag(42, "Seed for collection, the train/val split, init and batch order.")


MODEL_NAME_HELP = ("Registered model name (letters, digits, '.', '_', '-'); default "
                   "atari-vae-<game>.")
# What --train_steps 0 sizes a run for, by game title. SpaceInvaders' shots and score display
# need twice Breakout's steps to pass ST-DIM's 0.57 (docs/results.md, "SpaceInvaders at twice
# the step budget"); Breakout's and Pong's twice would break issue 14's 15 minutes on AVX2.
TRAIN_STEPS_BY_GAME = {"SpaceInvaders": 16000}
TRAIN_STEPS_OTHER_GAMES = 8000
EVAL_SAMPLES_HELP = (f"Selection frames per game (fresh episodes, seed {SELECTION_SEED}) on which "
                     "a new model and the current champion are compared.")


@dataclass
class TrainConfig(DataConfig):
    """Train a VAE on 64x64 RGB Atari frames."""

    latent_dim: int = flag(32, "Size of the latent vector z.")
    decoder: str = flag(
        "deconv", "Decoder: deconv (four stride-2 deconvolutions from a 4x4 grid) or broadcast "
        "(deconv plus a spatial broadcast path that places small objects).", choices=DECODERS)
    base_channels: int = flag(
        16, "Channels of the encoder's first stride-2 stage; the next three have 2x, 4x and 8x "
        "as many, and the decoder mirrors them. 32 is the classic 32-256 (World Models) "
        "width, at 3.7x the compute a frame.")
    batch_size: int = flag(64, "Frames per optimisation step.")
    epochs: int = flag(
        0, "Passes over the training frames; 0 = as many whole passes as it takes to reach "
        "--train_steps optimizer steps (so a run's length depends on the game's budget, not on "
        "how many frames its episodes hold).")
    train_steps: int = flag(
        0, "With --epochs 0: optimizer steps the run is sized for, rounded up to whole passes "
        "over the training frames; 0 = the game's budget ("
        + ", ".join(f"{g} {n}" for g, n in TRAIN_STEPS_BY_GAME.items())
        + f", any other game {TRAIN_STEPS_OTHER_GAMES}; several games: the largest).")
    lr: float = flag(
        4e-3, "Adam learning rate: linear warm-up over the first epoch (at most a tenth of the "
        "run), then cosine decay to 5%.")
    weight_decay: float = flag(
        0.0, "Decoupled weight decay (AdamW): each step shrinks every weight matrix and kernel "
        "by lr * weight_decay (biases untouched); 0 = plain Adam.")
    val_split: float = flag(0.1, "Share of episodes held out for validation, in (0, 1).")
    kl_weight: float = flag(
        0.1,
        "Weight of the KL term. The reconstruction term is a per-image SUM of squared errors "
        "over 3x64x64 values (foreground-weighted), the KL a sum over latent dims; both "
        "averaged over the batch.")
    fg_weight: float = flag(
        30.0,
        "Loss weight of foreground pixels: where the frame or its reconstruction differs from "
        "the training set's per-pixel median background by > 0.1; 1 = plain sum of squares.")
    obj_weight: float = flag(
        0.0,
        "Weight of the object term: around the frame's small moving objects (ball, shots), "
        "how where the reconstruction leaves the background differs from where the frame "
        "does, blurred at 1, 2 and 4 px, so a ball drawn a pixel off costs less than a ball "
        "left out; 0 = off.")
    loc_weight: float = flag(
        30.0,
        "Weight of the locator term: the model also predicts from z, as a categorical over "
        "pixel positions, where the frame's small moving objects (ball, shots) are; 0 = off "
        "(and no locator in the model).")
    coord_weight: float = flag(
        0.0,
        "Weight of the coordinate term: a line from z must give the (row, col) in pixels of "
        "the frame's small moving object wherever exactly one is in view (the ball), as a "
        "planner reads it; Gaussian log-likelihood of learned scale, in nats like the "
        "locator's; 30 for a planner (costs pixels at short budgets); 0 = off (and no "
        "coordinate head in the model).")
    fourier_weight: float = flag(
        1.0,
        "Weight of the Fourier term: a line from z must give the cos and sin of the row and "
        "column of the frame's small moving object, wherever exactly one is in view (the "
        "ball), at periods of 64, 25.4, 10.1 and 4 pixels: a code in which a linear classifier "
        "tells one pixel from the next; Gaussian log-likelihood of learned scale, in nats; "
        "0 = off (and no Fourier head in the model).")
    mask_weight: float = flag(
        10.0,
        "Weight of the mask term: a line from z must give, pixel by pixel, whether the frame "
        "differs from the background there (its foreground mask: paddle, ball, removed "
        "bricks), as Bernoulli logits; binary cross-entropy in nats summed over pixels; "
        "0 = off (and no mask head in the model).")
    object_oversample: float = flag(
        1.0, "How many times as often a training frame that shows a small moving object (the "
        "ball, shots) is drawn into an epoch as one that shows none; the pixels decide, never "
        "the RAM; 1 = every frame once a pass.")
    free_bits: float = flag(
        0.0, "KL free bits: nats per latent dim below which KL is not penalised (0 = off).")
    device: str = flag("auto", "Compute device; auto picks cuda, then mps, then cpu.",
                       choices=DEVICE_CHOICES)
    precision: str = flag(
        "auto", "Matmul precision; auto uses bf16 autocast where the device runs it fast.",
        choices=PRECISION_CHOICES)
    cuda_graph: str = flag(
        "auto", "auto: on CUDA, each training step's forward and backward replay as one "
        "captured CUDA graph (launching the step's many small kernels one by one costs more "
        "than running them); off: every kernel launched eagerly. CPU and MPS steps are eager.",
        choices=CUDA_GRAPH_CHOICES)
    output_dir: str = flag("outputs/vae_training", "Where models, checkpoints and plots go.")
    checkpoint_freq: int = flag(10, "Save a checkpoint and reconstructions every N epochs.")
    experiment_name: str = flag("atari-vae", "MLflow experiment to log into.")
    collect_policy: str = flag(
        "random", "Who plays the collected episodes: random, or a registered controller "
        "(atari-vae plan), models:/<name>@<alias> or models:/<name>/<version>, for "
        "--policy_mix of them, its actions epsilon-random (0.1).")
    policy_mix: float = flag(
        0.5, "Share of the episodes the controller plays when --collect_policy names one.")
    resume: bool = flag(
        False, "Continue the run recorded in output_dir from its newest checkpoint, with the "
        "same flags (--epochs may grow; added epochs run at the schedule's final 5%).",
        cli_only=True)

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value and what is allowed."""
        _validate_common(self)
        check.positive(self, "latent_dim", "base_channels", "batch_size", "checkpoint_freq")
        check.non_negative(self, "epochs", "train_steps")
        check.positive(self, "lr", "fg_weight", "object_oversample")
        check.non_negative(self, "weight_decay", "kl_weight", "free_bits", "obj_weight",
                           "loc_weight", "coord_weight", "fourier_weight", "mask_weight")
        if not 0.0 < self.val_split < 1.0:
            raise ConfigError(f"--val_split must be in (0, 1), got {self.val_split}")
        if self.num_episodes < 2:
            raise ConfigError(
                f"--num_episodes must be at least 2 (train and validation are split by "
                f"episode), got {self.num_episodes}")
        check.one_of(self, "precision", PRECISION_CHOICES)
        check.one_of(self, "cuda_graph", CUDA_GRAPH_CHOICES)
        check.one_of(self, "decoder", DECODERS)
        check.collect_policy(self)


@dataclass
class EvaluateConfig:
    """Evaluate a trained VAE on frames from fresh episodes."""

    model_path: str = flag(
        "outputs/vae_training/best_model.pt",
        "A state_dict file, a training checkpoint, models:/<name>@<alias>, "
        "models:/<name>/<version> or runs:/<run_id>/<game> (e.g. runs:/<id>/breakout).")
    env_name: str = flag("Breakout", "Game(s) to evaluate on; comma-separated for a table.")
    num_samples: int = flag(1000, "Held-out frames to score per game.")
    max_steps: int = flag(1000, "Longest episode kept, in agent steps.")
    seed: int = flag(
        10_000, "Seed for the fresh episodes (the mean frame and background come from other "
        "episodes, seed + 100000); keep it apart from training seeds.")
    probe_frames: int = flag(
        20_000, "Frames of fresh labelled episodes (seed + 200000) for the AtariARI state probe "
        "per annotated game, split by episode 70/10/20 into probe train/val/test; 0 = no probe.")
    collect_policy: str = flag(
        "random", "Who plays the scored episodes (and those of their mean frame): random, or a "
        "registered controller, models:/<name>@<alias> or models:/<name>/<version>, for "
        "--policy_mix of them; the state probe stays on random-policy episodes.")
    policy_mix: float = flag(
        1.0, "Share of the scored episodes the controller plays when --collect_policy names one.")
    device: str = flag("auto", "Compute device.", choices=DEVICE_CHOICES)
    output_dir: str = flag("outputs/vae_evaluation", "Where metrics and plots go.")
    experiment_name: str = flag("atari-vae", "MLflow experiment to log into.")

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value and what is allowed."""
        check.positive(self, "num_samples", "max_steps")
        check.non_negative(self, "probe_frames")
        check.one_of(self, "device", DEVICE_CHOICES, prefix=True)
        check.experiment_name(self)
        check.collect_policy(self)


@dataclass
class TuneConfig(TrainConfig):
    """Search kl_weight and latent_dim with Optuna; register the best model."""

    # Inherited but meaningless here: a study continues from its storage, not from --resume,
    # and each trial draws its own latent_dim and kl_weight.
    NOT_FLAGS: ClassVar[tuple[str, ...]] = ("resume", "latent_dim", "kl_weight",
                                            "collect_policy", "policy_mix", "train_steps")

    num_episodes: int = flag(20, "Random-policy episodes to collect per game (once per study).")
    epochs: int = flag(10, "Training epochs per trial.")
    checkpoint_freq: int = flag(1000, "Checkpoint every N epochs within a trial.")
    output_dir: str = flag("outputs/vae_tuning", "Trial outputs go to <output_dir>/trial_<n>.")
    n_trials: int = flag(20, "Trials this worker runs (0 with --timeout: until the timeout).")
    timeout: float = flag(0.0, "Stop starting trials after this many seconds (0 = no limit).")
    study_name: str = flag("atari-vae-study", "Optuna study; workers with the same name join.")
    storage: str = flag(
        "", "Optuna storage URL (postgresql://..., sqlite:///...); default sqlite:///optuna.db "
        "beside mlflow.db.")
    model_name: str = flag("", MODEL_NAME_HELP)
    kl_budget: float = flag(
        50.0, "Rate budget: held-out KL(q(z|x) || N(0, I)) in nats per frame; trials above it "
        "are infeasible and never picked.")
    kl_weight_min: float = flag(1e-3, "Lower end of the log-uniform kl_weight range.")
    kl_weight_max: float = flag(10.0, "Upper end of the log-uniform kl_weight range.")
    latent_dim_min: int = flag(8, "Smallest latent_dim tried (powers of two).")
    latent_dim_max: int = flag(128, "Largest latent_dim tried (powers of two).")
    eval_samples: int = flag(1000, EVAL_SAMPLES_HELP)
    heartbeat_interval: int = flag(
        30, "Seconds between trial heartbeats in a database storage; a trial silent for twice "
        "this (its worker died) is marked FAIL and retried once.")

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value and what is allowed."""
        super().validate()
        # the pruner's warm-up and the trials' length need a number
        check.positive(self, "epochs")
        check.non_negative(self, "n_trials", "timeout")
        if self.n_trials == 0 and self.timeout == 0:
            raise ConfigError("--n_trials must be at least 1 (or give --timeout), got 0")
        check.positive(self, "kl_budget", "kl_weight_min", "kl_weight_max", "latent_dim_min")
        if self.kl_weight_min > self.kl_weight_max:
            raise ConfigError("--kl_weight_min must not exceed --kl_weight_max")
        if self.latent_dim_min > self.latent_dim_max:
            raise ConfigError("--latent_dim_min must not exceed --latent_dim_max")
        if not power_of_two_dims(self.latent_dim_min, self.latent_dim_max):
            raise ConfigError(
                f"no power of two lies in --latent_dim_min {self.latent_dim_min} .. "
                f"--latent_dim_max {self.latent_dim_max}; widen the range (e.g. 8 .. 128)")
        check.positive(self, "eval_samples", "heartbeat_interval")
        check.model_name(self.model_name)


@dataclass
class RegisterConfig:
    """Put a trained model through the quality floor and the champion comparison."""

    model_path: str = flag(
        "outputs/vae_training/best_model.pt",
        "A .pt state_dict or checkpoint from train, or runs:/<run_id>/<game>.")
    env_name: str = flag(
        "Breakout", "Game(s) the model was trained on (comma-separated for a mix): the "
        "selection frames come from these.")
    model_name: str = flag("", MODEL_NAME_HELP)
    eval_samples: int = flag(1000, EVAL_SAMPLES_HELP)
    experiment_name: str = flag("atari-vae", "MLflow experiment of the run that logs the model.")

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value and what is allowed."""
        check.positive(self, "eval_samples")
        check.model_name(self.model_name)


@dataclass
class ServeConfig:
    """Serve a VAE's latent means over HTTP, with request limits."""

    model_uri: str = flag(
        "models:/atari-vae-breakout@champion",
        "models:/<name>@<alias>, models:/<name>/<version>, runs:/<run_id>/<game> or a .pt file.")
    host: str = flag("127.0.0.1", "Interface to bind; 0.0.0.0 exposes the server to the network.")
    port: int = flag(5001, "TCP port.")
    max_frames: int = flag(256, "Most frames one request may carry; more get HTTP 413.")
    max_request_mb: float = flag(
        72.0, "Largest request body in MiB (256 frames of float32 values as JSON take up to "
        "~63); larger gets HTTP 413.")
    device: str = flag("cpu", "Compute device.", choices=DEVICE_CHOICES)

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value and what is allowed."""
        check.positive(self, "port", "max_frames", "max_request_mb")
        if self.port > 65535:
            raise ConfigError(f"--port must be at most 65535, got {self.port}")
        check.one_of(self, "device", DEVICE_CHOICES, prefix=True)


CONTROL_CHOICES = ("random_encoder", "none")
FEATURE_CHOICES = ("mu", "mu_delta")
SERVE_CHOICES = ("controller", "auto")
# Test episodes are seeded from seed + TEST_SEED_OFFSET on; training episodes use seeds
# seed .. seed + generations * episodes_per_candidate - 1, which validate() keeps below it.
TEST_SEED_OFFSET = 1_000_000


@dataclass
class PlanConfig:
    """Train a linear controller on the champion VAE's z with CMA-ES, on game score."""

    env_name: str = flag("Breakout", "Game to play (one): Breakout, Pong, ALE/Pong-v5, ...")
    model_name: str = flag("", "Registered VAE to plan from; default atari-vae-<game>. The "
                           "controller is registered as <model_name>-controller.")
    alias: str = flag("champion", "Alias of the VAE version to load.")
    features: str = flag(
        "mu", "Controller input: mu (the posterior mean) or mu_delta (mu and mu minus the "
        "previous step's mu: motion).", choices=FEATURE_CHOICES)
    generations: int = flag(60, "Most CMA-ES generations (see --time_budget_minutes).")
    popsize: int = flag(16, "CMA-ES population: candidate controllers per generation.")
    sigma0: float = flag(0.5, "CMA-ES initial step size (weights start at 0).")
    episodes_per_candidate: int = flag(
        2, "Episodes per candidate per generation (every candidate plays the same seeds); "
        "fitness = their mean score.")
    max_steps: int = flag(1000, "Longest episode, in agent steps (frameskip 4), training and "
                          "test alike.")
    serve: str = flag(
        "controller", "Who presses FIRE to serve: the controller, or auto (FIRE on the first "
        "step and after each lost life, as FireResetEnv under EpisodicLifeEnv; the "
        "controller plays the rally; every policy, random and control too).", choices=SERVE_CHOICES)
    test_episodes: int = flag(
        30, f"Fresh test episodes (seeds from seed + {TEST_SEED_OFFSET}, never trained on) "
        "for the controller, the random policy and the control.")
    time_budget_minutes: float = flag(
        12.0, "Stop starting CMA-ES generations after this many minutes, per controller "
        "(ours, then the control); 0 = no limit.")
    control: str = flag(
        "random_encoder", "Also train the control: the same controller and CMA-ES on a "
        "randomly initialised encoder of the same shape (none = skip).",
        choices=CONTROL_CHOICES)
    seed: int = flag(0, "Seed of CMA-ES, training episodes (seed + k) and the random policy.")
    device: str = flag("cpu", "Device of the encoder.", choices=DEVICE_CHOICES)
    threads: int = flag(
        1, "Torch CPU threads for the encoder (batches of <= popsize x episodes frames); 1 "
        "leaves the cores to the emulator threads (2 were 20x slower on a busy 2-core box).")
    output_dir: str = flag("outputs/plan", "Where the controller, the strip and scores go.")
    experiment_name: str = flag("atari-vae", "MLflow experiment to log into.")

    def validate(self) -> None:
        """Raise ConfigError naming the first bad value and what is allowed."""
        if "," in self.env_name:
            raise ConfigError(f"--env_name takes one game for plan, got {self.env_name!r}")
        check.positive(self, "generations", "popsize", "sigma0", "episodes_per_candidate",
                       "max_steps", "test_episodes", "threads")
        check.non_negative(self, "time_budget_minutes", "seed")
        if self.test_episodes >= TEST_SEED_OFFSET:
            raise ConfigError(f"--test_episodes must stay below {TEST_SEED_OFFSET}")
        if self.popsize < 2:
            raise ConfigError(f"--popsize must be at least 2 (CMA-ES), got {self.popsize}")
        if self.generations * self.episodes_per_candidate >= TEST_SEED_OFFSET:
            raise ConfigError("--generations x --episodes_per_candidate must stay below "
                              f"{TEST_SEED_OFFSET} (training seeds would reach test seeds)")
        check.one_of(self, "features", FEATURE_CHOICES)
        check.one_of(self, "control", CONTROL_CHOICES)
        check.one_of(self, "serve", SERVE_CHOICES)
        check.one_of(self, "device", DEVICE_CHOICES, prefix=True)
        check.model_name(self.model_name)
        if not self.alias.strip():
            raise ConfigError("--alias must not be empty (e.g. champion)")
        check.experiment_name(self)


def power_of_two_dims(low: int, high: int) -> list[int]:
    """The latent sizes a study tries: powers of two in [low, high]."""
    return [2**k for k in range(31) if low <= 2**k <= high]


def fields_of(config_cls: type) -> list[dataclasses.Field]:
    """The fields of a job config that are its flags, in declaration order."""
    hidden = getattr(config_cls, "NOT_FLAGS", ())
    return [f for f in dataclasses.fields(config_cls) if f.name not in hidden]


def _validate_common(cfg: Any) -> None:
    check.positive(cfg, "num_episodes", "max_steps")
    check.one_of(cfg, "device", DEVICE_CHOICES, prefix=True)
    check.experiment_name(cfg)
