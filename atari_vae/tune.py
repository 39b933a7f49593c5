"""The tune job: an Optuna study over ``kl_weight`` and ``latent_dim``, then the registry.

Objective (single, maximised): held-out *balanced PSNR*, 10·log10(1 / balanced MSE) with
balanced MSE = (foreground MSE + background MSE) / 2 on the validation episodes. Foreground
pixels differ from the training set's static background by > 0.1 (``metrics.py``), so objects
and background count equally however few object pixels there are, and neither the trial's
``kl_weight`` nor ``fg_weight`` enters the measure. Alone it would favour the smallest KL
weight and the widest latent (an unregularised autoencoder), so it is subject to a rate
budget: the held-out KL(q(z|x) || N(0, I)) of the trial's model, in nats per frame, must not
exceed ``--kl_budget`` (an Optuna constraint). The pick is the best feasible complete trial.

Pruning: MedianPruner on a per-epoch value that is the balanced PSNR while the epoch's
held-out KL is within budget and minus the excess nats otherwise, so over-budget trials rank
below every feasible one and the pruner does not keep them at the feasible ones' expense.

``n_trials`` counts this worker's trials; workers sharing storage and study name add theirs to
one study. After its trials each worker registers the study's best feasible trial
(``champion.py`` decides the alias).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from atari_vae import champion, registry, tracking
from atari_vae.config import TrainConfig, TuneConfig, power_of_two_dims
from atari_vae.data import FrameSet, load_games, split_by_episode
from atari_vae.envs import Game, parse_games, to_float
from atari_vae.errors import AtariVaeError, ConfigError
from atari_vae.files import atomic_path
from atari_vae.jobs import check_output_dir
from atari_vae.losses import foreground_mask
from atari_vae.metrics import balanced_psnr, game_references, per_frame
from atari_vae.runtime import resolve_device
from atari_vae.train import fit

log = logging.getLogger(__name__)
CONSTRAINT = "kl_over_budget"
STORAGE_FILE = "optuna.db"
SAMPLER_STARTUP_TRIALS = 8
PRUNER_STARTUP_TRIALS = 3
STORAGE_ATTEMPTS = 3
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@dataclass
class TuneResult:
    """What one tune invocation leaves: the study's best feasible trial and the registry verdict."""

    study_name: str
    storage: str
    run_id: str
    best_trial: int
    best_value: float
    best_params: dict[str, Any]
    decision: registry.ChampionDecision


def tune_job(cfg: TuneConfig) -> TuneResult:
    """Validate flags, run this worker's trials of the shared study, register the best trial."""
    cfg.validate()
    games = parse_games(cfg.env_name)
    resolve_device(cfg.device)
    check_output_dir(cfg.output_dir)
    optuna.logging.disable_default_handler()  # Optuna's lines go through our log format
    optuna.logging.enable_propagation()
    url = resolve_storage(cfg.storage)
    study = open_study(cfg, url)
    name = cfg.model_name or default_model_name(games)
    tracking.configure(cfg.experiment_name)
    titles = [g.title for g in games]
    tags = {**tracking.base_tags("tune", titles), "optuna_study": cfg.study_name,
            "optuna_storage": display_url(url), "registered_model": name}
    with tracking.tracked_run(f"tune-{cfg.study_name}", tags) as run:
        tracking.log_config(cfg)
        frames = load_games(games, cfg.num_episodes, cfg.max_steps, cfg.seed)
        train_set, val_set = split_by_episode(frames, cfg.val_split, cfg.seed)
        started = time.perf_counter()
        study.optimize(Objective(cfg, train_set, val_set), n_trials=cfg.n_trials or None,
                       timeout=cfg.timeout or None, gc_after_trial=True)
        tracking.log_metrics({"tune_seconds": time.perf_counter() - started})
        best = best_feasible_trial(study)
        tracking.log_files(study_figures(study, Path(cfg.output_dir), cfg.kl_budget),
                           "study_plots")
        if best is None:
            raise AtariVaeError(no_feasible_message(study, cfg))
        tracking.log_params({f"best_{k}": v for k, v in best.params.items()})
        tracking.log_metrics({"best_value": best.value, "best_trial": best.number,
                              "best_kl": best.user_attrs["kl"]})
        log.info("study %s: %d trials; best feasible trial %d: %s, balanced PSNR %.2f dB, KL "
                 "%.1f nats/frame", cfg.study_name, len(study.trials), best.number, best.params,
                 best.value, best.user_attrs["kl"])
        decision = register_best(best, cfg, games, name)
        tracking.set_tags({"registered_version": decision.version,
                           "champion_decision": decision.reason})
    return TuneResult(cfg.study_name, display_url(url), run.info.run_id, best.number,
                      best.value, best.params, decision)


# --- storage and study ------------------------------------------------------------------------

def resolve_storage(storage: str) -> str:
    """The Optuna storage URL: ``storage``, else sqlite optuna.db beside a SQLite mlflow.db."""
    if storage:
        return storage
    uri = tracking.tracking_uri()
    folder = Path(uri[len("sqlite:///"):]).parent if uri.startswith("sqlite:///") else Path()
    return f"sqlite:///{(folder / STORAGE_FILE).resolve()}"


def display_url(url: str) -> str:
    """``url`` with any password masked, for logs, tags and messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL: the message names it as given
        return url


def open_storage(url: str, heartbeat_interval: int) -> optuna.storages.BaseStorage:
    """An RDB storage with heartbeats, so a killed worker's trial turns FAIL and is retried once."""
    url = with_installed_driver(url)
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}  # workers wait for SQLite's write lock
    elif url.startswith("postgresql"):
        kwargs["connect_args"] = {"connect_timeout": 10}
    last: Exception | None = None
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_interval,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=1))
        except Exception as exc:  # bad URL, missing driver, server down, schema-creation race
            last = exc
            if "already exists" not in str(exc):
                break
            time.sleep(1.0 + attempt)
    first = str(last).strip().splitlines()[0][:200] if str(last).strip() else type(last).__name__
    hint = " (pip install psycopg2-binary)" if isinstance(last, ImportError) else ""
    raise ConfigError(
        f"--storage {display_url(url)!r} cannot be opened ({first}){hint}; give an Optuna "
        f"storage URL such as sqlite:///optuna.db or postgresql://user@host:5432/db")


def with_installed_driver(url: str) -> str:
    """postgresql:// with psycopg2 when psycopg 3 (SQLAlchemy 2.1's default driver) is absent."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def open_study(cfg: TuneConfig, url: str) -> optuna.Study:
    """Create or join the study: workers with the same storage and name share it."""
    storage = open_storage(url, cfg.heartbeat_interval)
    # Unseeded sampler: parallel workers started together must not propose the same points.
    sampler = optuna.samplers.TPESampler(n_startup_trials=SAMPLER_STARTUP_TRIALS,
                                         constant_liar=True)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS,
                                         n_warmup_steps=max(1, cfg.epochs // 3))
    try:
        return optuna.create_study(storage=storage, study_name=cfg.study_name,
                                   direction="maximize", sampler=sampler, pruner=pruner,
                                   load_if_exists=True)
    except ValueError as exc:  # e.g. an existing study of the same name with other directions
        raise ConfigError(f"--study_name {cfg.study_name!r}: {exc}") from exc


def default_model_name(games: list[Game]) -> str:
    """atari-vae-breakout, atari-vae-space-invaders, atari-vae-breakout-pong."""
    return "atari-vae-" + "-".join(g.rom_id.replace("_", "-") for g in games)


# --- the objective ------------------------------------------------------------------------------

def pruning_value(value: float, kl: float, budget: float) -> float:
    """``value`` within the rate budget, else minus the excess nats (below any feasible value)."""
    return value if kl <= budget else -(kl - budget)


def foreground_fraction(train_set: FrameSet, val_set: FrameSet, chunk: int = 1024) -> float:
    """Share of validation pixels off their game's training background, as training sees it."""
    backgrounds = game_references(train_set.frames_uint8, train_set.game_ids,
                                  len(train_set.games)).backgrounds
    frames, game_ids = val_set.frames_uint8, val_set.game_ids
    fg = sum(foreground_mask(to_float(frames[i:i + chunk]),
                             per_frame(backgrounds, game_ids[i:i + chunk])).sum().item()
             for i in range(0, len(frames), chunk))
    return fg / (len(frames) * frames.shape[2] * frames.shape[3])


class TrialHooks:
    """Log each epoch to the trial's MLflow run, report it to Optuna, prune hopeless trials."""

    def __init__(self, trial: optuna.Trial, cfg: TuneConfig, fg_fraction: float) -> None:
        self.trial, self.cfg, self.fg_fraction = trial, cfg, fg_fraction
        self.mlflow = tracking.MlflowTrainHooks()

    def on_epoch_end(self, epoch: int, stats: dict[str, float]) -> None:
        value = balanced_psnr(10 ** (-stats["val_psnr"] / 10), 10 ** (-stats["val_fg_psnr"] / 10),
                              self.fg_fraction)
        reported = pruning_value(value, stats["val_kl"], self.cfg.kl_budget)
        self.mlflow.on_epoch_end(epoch, {**stats, "val_balanced_psnr": value,
                                         "pruning_value": reported})
        self.trial.report(reported, epoch)
        # pruning after the last epoch would only throw a finished model away
        if epoch < self.cfg.epochs and self.trial.should_prune():
            raise optuna.TrialPruned(f"epoch {epoch}: {reported:.3f} is below the median")

    def on_checkpoint(self, epoch: int, files: list[Path]) -> None:
        self.mlflow.on_checkpoint(epoch, files)


def trial_config(cfg: TuneConfig, number: int, **params: Any) -> TrainConfig:
    """The TrainConfig of one trial: the study's training flags plus the trial's params."""
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}
    base.update(params, output_dir=str(Path(cfg.output_dir) / f"trial_{number}"), resume=False)
    return TrainConfig(**base)


class Objective:
    """One trial: sample params, train in a nested MLflow run, return the held-out value."""

    def __init__(self, cfg: TuneConfig, train_set: FrameSet, val_set: FrameSet) -> None:
        self.cfg, self.train_set, self.val_set = cfg, train_set, val_set
        self.fg_fraction = foreground_fraction(train_set, val_set)
        self.titles = list(train_set.games)

    def __call__(self, trial: optuna.Trial) -> float:
        cfg = self.cfg
        params = {"kl_weight": trial.suggest_float("kl_weight", cfg.kl_weight_min,
                                                   cfg.kl_weight_max, log=True),
                  "latent_dim": trial.suggest_categorical(
                      "latent_dim", power_of_two_dims(cfg.latent_dim_min, cfg.latent_dim_max))}
        if "mlflow_run_id" in trial.user_attrs:  # a retry carries the killed trial's attrs
            tracking.mark_killed(trial.user_attrs["mlflow_run_id"])
        try:
            return self._train(trial, params)
        except optuna.TrialPruned:
            raise
        except Exception as exc:  # any failure fails this trial only; the study goes on
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            trial.set_user_attr("error", f"{type(exc).__name__}: {message}"[:500])
            log.warning("trial %d failed (%s): %s", trial.number, type(exc).__name__, message,
                        exc_info=not isinstance(exc, AtariVaeError))
            return float("nan")  # Optuna marks the trial FAIL

    def _train(self, trial: optuna.Trial, params: dict[str, Any]) -> float:
        trial_cfg = trial_config(self.cfg, trial.number, **params)
        tags = {**tracking.base_tags("tune-trial", self.titles), "optuna_study":
                self.cfg.study_name, "optuna_trial": trial.number}
        pruned: optuna.TrialPruned | None = None
        with tracking.tracked_run(f"trial-{trial.number}", tags, nested=True) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            tracking.log_config(trial_cfg)
            try:
                result = fit(trial_cfg, self.train_set, self.val_set,
                             TrialHooks(trial, self.cfg, self.fg_fraction))
            except optuna.TrialPruned as exc:
                pruned = exc
                tracking.set_tags({"optuna_state": "PRUNED"})
            except Exception as exc:
                tracking.set_tags({"optuna_state": "FAIL", "error": str(exc)[:500]})
                raise
            if pruned is None:
                value, kl = self._finish(trial, trial_cfg, result)
        if pruned is not None:
            raise pruned
        tracking.log_metrics({"trial_value": value, "trial_kl": kl}, step=trial.number)
        return value

    def _finish(self, trial: optuna.Trial, trial_cfg: TrainConfig, result: Any) -> tuple[float,
                                                                                        float]:
        m = result.val_metrics
        value = balanced_psnr(m["mse"], m["fg_mse"], m["fg_fraction"])
        kl = next(s["val_kl"] for s in result.history if s["epoch"] == result.best_epoch)
        trial.set_constraint(CONSTRAINT, kl - self.cfg.kl_budget)
        feasible = kl <= self.cfg.kl_budget
        metrics = {**m, "balanced_psnr": value, "kl": kl, "best_epoch": result.best_epoch}
        tracking.log_files([p for p in result.files.values() if p.suffix == ".png"])
        info = registry.log_vae_model(result.model, {
            "game": ",".join(self.titles), "kl_weight": trial_cfg.kl_weight,
            "fg_weight": trial_cfg.fg_weight, "optuna_study": self.cfg.study_name,
            "optuna_trial": trial.number}, metrics=metrics, step=trial_cfg.epochs)
        for key in ("psnr", "fg_psnr", "fg_accuracy", "baseline_fg_accuracy"):
            trial.set_user_attr(key, m[key])
        trial.set_user_attr("kl", kl)
        trial.set_user_attr("model_uri", info.model_uri)
        tracking.set_tags({"optuna_state": "COMPLETE", "feasible": feasible})
        log.info("trial %d: balanced PSNR %.2f dB, fg_accuracy %.3f, KL %.1f nats/frame (%s "
                 "budget %.1f)", trial.number, value, m["fg_accuracy"], kl,
                 "within" if feasible else "over", self.cfg.kl_budget)
        return value, kl


def best_feasible_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The complete trial with the highest value among those within the rate budget."""
    feasible = [t for t in study.get_trials(deepcopy=False,
                                            states=(optuna.trial.TrialState.COMPLETE,))
                if t.value is not None and all(v <= 0 for v in t.constraints.values())
                and CONSTRAINT in t.constraints]
    return max(feasible, key=lambda t: t.value) if feasible else None


def no_feasible_message(study: optuna.Study, cfg: TuneConfig) -> str:
    """Why nothing was registered, with what would help."""
    trials = study.get_trials(deepcopy=False)
    counts = {s.name: sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
    kls = [t.user_attrs["kl"] for t in trials if "kl" in t.user_attrs]
    detail = (f"lowest held-out KL {min(kls):.1f} nats/frame is over --kl_budget "
              f"{cfg.kl_budget}; raise it or --kl_weight_min" if kls else
              "no trial completed; see the log above for why trials failed or were pruned")
    return (f"study {cfg.study_name!r} has no feasible complete trial to register "
            f"({counts['COMPLETE']} complete, {counts['PRUNED']} pruned, {counts['FAIL']} "
            f"failed): {detail}")


# --- figures ------------------------------------------------------------------------------------

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


# --- registry -----------------------------------------------------------------------------------

def register_best(best: optuna.trial.FrozenTrial, cfg: TuneConfig, games: list[Game],
                  name: str) -> registry.ChampionDecision:
    """Register the best feasible trial's model with tags for its metrics and provenance."""
    u = best.user_attrs
    tags = {"game": ",".join(g.title for g in games), "latent_dim": best.params["latent_dim"],
            "kl_weight": best.params["kl_weight"], "fg_weight": cfg.fg_weight,
            "val_balanced_psnr": round(best.value, 4), "val_kl": round(u["kl"], 3),
            "val_fg_accuracy": round(u["fg_accuracy"], 4), "val_psnr": round(u["psnr"], 4),
            "val_fg_psnr": round(u["fg_psnr"], 4), "optuna_study": cfg.study_name,
            "optuna_trial": best.number, "preprocessing": registry.PREPROCESSING,
            "epochs": cfg.epochs, "num_episodes": cfg.num_episodes}
    description = (
        f"VAE encoder for {tags['game']} (64x64 RGB; atari_vae.preprocess). Trial {best.number} "
        f"of Optuna study {cfg.study_name!r}: latent_dim {tags['latent_dim']}, kl_weight "
        f"{best.params['kl_weight']:.4g}, fg_weight {cfg.fg_weight:g}. Validation: balanced PSNR "
        f"{best.value:.2f} dB, fg_accuracy {u['fg_accuracy']:.3f}, KL {u['kl']:.1f} nats/frame "
        f"(budget {cfg.kl_budget:g}). Load: atari_vae.load_registered({name!r}).")
    if not tracking.run_exists(u["mlflow_run_id"]):
        raise AtariVaeError(
            f"the study's best trial {best.number} logged its model to another MLflow store "
            f"(run {u['mlflow_run_id']} is not in {tracking.tracking_uri()}); workers of one "
            f"study must share MLFLOW_TRACKING_URI")
    return champion.register_candidate(u["model_uri"], u["mlflow_run_id"], name, games,
                                       cfg.eval_samples, tags, description)

