"""Promotion policy: which registered version holds the ``champion`` alias, and tags saying why.

A version can be champion only if it passes the quality floor: on the selection frames of every
game its PSNR and fg_accuracy beat the mean frame's by ``config.FLOOR_PSNR_MARGIN_DB`` and
``config.FLOOR_FG_ACCURACY_MARGIN``. Of the versions that pass on the same frames (the
``selection_frames`` tag), the one with the highest ``metrics.mean_balanced_psnr`` (the tuning
objective) holds the alias. Selection frames: ``eval_samples`` frames of fresh episodes from
``config.SELECTION_SEED``, never the frames ``evaluate`` reports by default.

Faults: a store that does not answer aborts the promotion after a bounded retry and changes
nothing; a champion that does not load, has non-finite weights or a non-finite score is demoted
(``champion_demoted`` tag); non-finite scores are never stored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from atari_vae import registry, tracking
from atari_vae.collect import COLLECTOR_VERSION
from atari_vae.config import (
    FLOOR_FG_ACCURACY_MARGIN,
    FLOOR_PSNR_MARGIN_DB,
    SELECTION_SEED,
    EvaluateConfig,
)
from atari_vae.envs import Game
from atari_vae.files import first_line
from atari_vae.metrics import mean_balanced_psnr
from atari_vae.model import VAE
from atari_vae.registry_retry import (
    PromotionAborted,
    is_network_error,
    is_not_found,
    with_retry,
)

log = logging.getLogger(__name__)

CHAMPION = "champion"
SCORE_TAG = "selection_score"
EVAL_TAG = "selection_frames"
FLOOR_TAG = "quality_floor"  # "passed" or "failed: <why>"
DECISION_TAG = "champion_decision"
DEMOTED_TAG = "champion_demoted"
STATE_TAG = "promotion_state"  # "pending" while its score is being taken
PENDING_SINCE_TAG = "promotion_pending_since"
PASSED = "passed"
EVAL_KEY_VERSION = 2  # bump when the measure or the frames change: old scores are not compared
LOCK_TIMEOUT_S = 900
PENDING_WAIT_S = 300  # a registration pending longer than this is taken as crashed


@dataclass
class ChampionDecision:
    """What happened to the ``champion`` alias when ``version`` was put up for it."""

    name: str
    version: str
    score: float | None  # selection score; None when it could not be taken
    moved: bool  # ``version`` holds the alias afterwards
    reason: str
    champion: str | None  # the version holding the alias afterwards, if any


class SelectionScorer:
    """Per-game metrics on the selection frames (SELECTION_SEED), the same for every version."""

    def __init__(self, games: list[Game], num_samples: int) -> None:
        from atari_vae.evaluate import SCORED_FRAMES_PER_EPISODE

        self.games = games
        self.eval_cfg = EvaluateConfig(num_samples=num_samples, seed=SELECTION_SEED,
                                       device="cpu")
        self._sets: dict[str, tuple[Any, ...]] = {}
        # Everything that picks the frames is in the key: scores on other frames never meet.
        self.key = (f"v{EVAL_KEY_VERSION} mean_balanced_psnr "
                    f"{'+'.join(g.title for g in games)} seed={self.eval_cfg.seed} "
                    f"n={num_samples} max_steps={self.eval_cfg.max_steps} "
                    f"collector={COLLECTOR_VERSION} frames_per_episode={SCORED_FRAMES_PER_EPISODE}")

    def __call__(self, model: VAE) -> dict[str, dict[str, float]]:
        from atari_vae.evaluate import held_out_set, score_model

        per_game = {}
        for game in self.games:
            if game.title not in self._sets:
                cfg = dataclasses.replace(self.eval_cfg, env_name=game.title)
                self._sets[game.title] = held_out_set(game, cfg)
            frames, mean_frame, background = self._sets[game.title]
            per_game[game.title] = score_model(model, frames.frames_uint8, mean_frame,
                                               background)[0]
        return per_game


def floor_failure(per_game: dict[str, dict[str, float]]) -> str | None:
    """Every margin these per-game metrics miss of the quality floor, or None when all pass."""
    misses = []
    for game, m in per_game.items():
        if not m["psnr"] - m["baseline_psnr"] >= FLOOR_PSNR_MARGIN_DB:  # NaN misses too
            misses.append(f"{game}: PSNR {m['psnr']:.2f} dB is not {FLOOR_PSNR_MARGIN_DB:g} dB "
                          f"above the mean frame's {m['baseline_psnr']:.2f}")
        if not m["fg_accuracy"] - m["baseline_fg_accuracy"] >= FLOOR_FG_ACCURACY_MARGIN:
            misses.append(f"{game}: fg_accuracy {m['fg_accuracy']:.3f} is not "
                          f"{FLOOR_FG_ACCURACY_MARGIN:g} above the mean frame's "
                          f"{m['baseline_fg_accuracy']:.3f}")
    return ", and ".join(misses) or None


# --- talking to the registry ---------------------------------------------------------------------

def champion_version(name: str, client: Any = None) -> str | None:
    """The version holding ``champion`` of ``name``, if any (aborts when the store is down)."""
    import mlflow

    client = client or mlflow.MlflowClient()
    try:
        aliases = with_retry(f"read the champion of {name!r}",
                             lambda: client.get_registered_model(name).aliases)
    except mlflow.exceptions.MlflowException as exc:
        if is_not_found(exc):  # no such registered model yet
            return None
        raise
    return str(aliases[CHAMPION]) if CHAMPION in aliases else None


def mark_pending(client: Any, name: str, version: str) -> None:
    """Mark a version as being scored: deciders wait for it rather than crown a worse one."""
    tracking.set_version_tags(client, name, version,
                              {STATE_TAG: "pending", PENDING_SINCE_TAG: repr(time.time())})


def _delete_tag(client: Any, name: str, version: str, key: str) -> None:
    with contextlib.suppress(Exception):  # absent already
        client.delete_model_version_tag(name, version, key)


def valid_score(tags: dict[str, str], eval_key: str) -> float | None:
    """A version's stored finite score on the frames ``eval_key`` names, if it may be champion."""
    if tags.get(EVAL_TAG) != eval_key or tags.get(FLOOR_TAG) != PASSED or DEMOTED_TAG in tags:
        return None
    try:
        value = float(tags[SCORE_TAG])
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) else None


# --- scoring a version ----------------------------------------------------------------------------

def _fetch_vae_dir(client: Any, name: str, version: str) -> Path | str:
    """The version's local ``vae/`` folder, or why its files cannot be had; aborts while the
    store does not answer (a network blip must never count against a model)."""
    what = f"fetch version {version} of {name!r}"
    try:
        return with_retry(what, lambda: registry.download_vae_dir(f"models:/{name}/{version}"),
                          transient=is_network_error)
    except PromotionAborted:
        raise
    except Exception as exc:
        with_retry(what, lambda: client.get_model_version(name, version))  # the store answers
        return f"its files cannot be fetched ({first_line(exc)})"


def _load_version(client: Any, name: str, version: str) -> VAE | str:
    """The version's model, or why it is unusable: files missing, not loading, not finite."""
    vae_dir = _fetch_vae_dir(client, name, version)
    if isinstance(vae_dir, str):
        return vae_dir
    try:
        model = registry.load_vae_dir(vae_dir)
    except Exception as exc:  # wrong shapes raise RuntimeError, a bad config KeyError ...
        return f"it does not load ({type(exc).__name__}: {first_line(exc)})"
    if not all(torch.isfinite(t).all() for t in model.state_dict().values()):
        return "its weights are not finite"
    return model


def score_version(client: Any, name: str, version: str, scorer: SelectionScorer,
                  model: VAE | str | None = None) -> tuple[float | None, str | None]:
    """(selection score, why it cannot be champion) of a registered version; records the tags.

    Any failure to load or score, non-finite weights or a non-finite score is a reason, never a
    stored score.
    """
    model = _load_version(client, name, version) if model is None else model
    if isinstance(model, str):
        return None, model
    try:
        per_game = scorer(model)
        value = mean_balanced_psnr(per_game.values())
    except Exception as exc:
        if is_network_error(exc):
            raise
        return None, f"it cannot be scored ({type(exc).__name__}: {first_line(exc)})"
    if not math.isfinite(value):
        return None, f"its selection score is {value}"
    floor = floor_failure(per_game)
    tracking.set_version_tags(client, name, version, {
        FLOOR_TAG: PASSED if floor is None else f"failed: {floor}", SCORE_TAG: repr(value),
        EVAL_TAG: scorer.key})
    _delete_tag(client, name, version, DEMOTED_TAG)  # it loads and scores again
    return value, floor and f"below the quality floor ({floor})"


def _forget_score(client: Any, name: str, version: str) -> None:
    """Drop a stored score so it is never compared again (its version failed or broke)."""
    _delete_tag(client, name, version, SCORE_TAG)
    _delete_tag(client, name, version, EVAL_TAG)


def demote(client: Any, name: str, version: str, why: str) -> None:
    """Take ``champion`` from a broken version and say why on it."""
    log.warning("demoting champion version %s of %s: %s", version, name, why)
    _forget_score(client, name, version)
    tracking.set_version_tags(client, name, version, {DEMOTED_TAG: why})
    with contextlib.suppress(Exception):  # another writer may have moved it already
        if champion_version(name, client) == version:
            client.delete_registered_model_alias(name, CHAMPION)


# --- the decision ---------------------------------------------------------------------------------

def _wait_for_pending(client: Any, name: str, version: str) -> None:
    """Wait (bounded) while another registration of ``name`` is still being scored, so a worse
    model never takes the alias first."""
    deadline = time.time() + PENDING_WAIT_S
    while time.time() < deadline:
        now = time.time()
        pending = [str(v.version) for v in client.search_model_versions(f"name='{name}'")
                   if str(v.version) != version and v.tags.get(STATE_TAG) == "pending"
                   and now - float(v.tags.get(PENDING_SINCE_TAG, 0)) < PENDING_WAIT_S]
        if not pending:
            return
        log.info("waiting for the score of %s version(s) %s", name, ", ".join(pending))
        time.sleep(1.0)


def settle_champion(name: str, eval_key: str, rounds: int = 10) -> str | None:
    """Point ``champion`` at the best version that may be champion under ``eval_key``; repeat
    until stable. A holder judged on these frames that may not be champion loses the alias."""
    import mlflow

    client = mlflow.MlflowClient()
    holder = champion_version(name, client)
    for _ in range(rounds):
        versions = {str(v.version): v.tags for v in client.search_model_versions(f"name='{name}'")}
        scored = {v: s for v, tags in versions.items()
                  if (s := valid_score(tags, eval_key)) is not None}
        if not scored:
            tags = versions.get(holder, {})
            if holder and (DEMOTED_TAG in tags or (tags.get(EVAL_TAG) == eval_key
                                                   and tags.get(FLOOR_TAG) != PASSED)):
                if _move_alias(client, name, None):
                    return None
                holder = champion_version(name, client)
                continue
            return holder
        best = max(scored, key=lambda v: (scored[v], v == holder))  # ties keep the holder
        if best == holder:
            return holder
        log.debug("champion of %s: version %s scores %.3f, above version %s; moving the alias",
                  name, best, scored[best], holder)
        _move_alias(client, name, best)
        holder = champion_version(name, client)
    return holder


def _move_alias(client: Any, name: str, version: str | None) -> bool:
    """Point ``champion`` at ``version`` (None: remove it); False when a rival writing at the same
    moment won the store's race (on PostgreSQL a duplicate key), so the caller re-reads."""
    from mlflow.exceptions import MlflowException

    try:
        if version is None:
            client.delete_registered_model_alias(name, CHAMPION)
        else:
            client.set_registered_model_alias(name, CHAMPION, version)
        return True
    except MlflowException as exc:
        log.info("moving the champion alias of %s raced another writer (%s); deciding again",
                 name, str(exc).splitlines()[0][:200])
        return False


def _check_champion(client: Any, name: str, current: str, scorer: SelectionScorer) -> str | None:
    """Why the current champion must be demoted, or None; scores it if these frames are new."""
    tags = with_retry(f"read champion version {current} of {name!r}",
                      lambda: client.get_model_version(name, current)).tags
    model = _load_version(client, name, current)
    if isinstance(model, str):
        return model
    if tags.get(EVAL_TAG) == scorer.key:
        return None  # scored on these frames before: the stored verdict stands
    value, why = score_version(client, name, current, scorer, model)
    return why if value is None else None


def _explain(client: Any, name: str, version: str, key: str, before: str | None,
             holder: str | None, score: float | None, own: str | None,
             demoted: str | None) -> str:
    """The one-line champion_decision for ``version``."""
    gone = f"champion version {before} was demoted ({demoted}); " if demoted else ""
    if own:
        rest = f"champion stays version {holder}" if holder else "no champion is set"
        return f"{gone}version {version} cannot be champion: {own}; {rest}"
    if holder == version:
        if before == version:
            return f"version {version} already is the champion"
        if before is None or demoted:
            return f"{gone or 'no champion yet; '}selection score {score:.3f}, above the floor"
        old = valid_score(client.get_model_version(name, before).tags, key)
        return (f"selection score {score:.3f} beats champion version {before}'s "
                f"{old if old is None else format(old, '.3f')}")
    old = valid_score(client.get_model_version(name, holder).tags, key) \
        if holder else None
    return (f"{gone}selection score {score:.3f} does not beat champion version {holder}'s "
            f"{old if old is None else format(old, '.3f')}")


def promote_version(name: str, version: str, games: list[Game],
                    eval_samples: int) -> ChampionDecision:
    """Give ``champion`` to a registered (pending) version only if it passes the floor and beats
    the current champion on the selection frames; record why on the version."""
    import mlflow

    client = mlflow.MlflowClient()
    scorer = SelectionScorer(games, eval_samples)
    try:
        score, own = score_version(client, name, version, scorer)
        if score is None:  # a score from an earlier try must not stand for this one
            _forget_score(client, name, version)
        tracking.set_version_tags(client, name, version, {STATE_TAG: "scored"})
        with tracking.local_store_lock("registry", LOCK_TIMEOUT_S):
            _wait_for_pending(client, name, version)
            before = champion_version(name, client)
            demoted = None
            if before is not None and before != version:
                demoted = _check_champion(client, name, before, scorer)
                if demoted:
                    demote(client, name, before, demoted)
            holder = settle_champion(name, scorer.key)
    except Exception as exc:
        if isinstance(exc, PromotionAborted) or not is_network_error(exc):
            raise
        raise PromotionAborted(
            f"the registry at {tracking.tracking_uri()} stopped answering while version "
            f"{version} of {name!r} was put up ({first_line(exc)}); the promotion is aborted"
        ) from exc
    finally:
        with contextlib.suppress(Exception):  # the store may be the thing that failed
            tracking.set_version_tags(client, name, version, {STATE_TAG: "done"})
    reason = _explain(client, name, version, scorer.key, before, holder, score, own, demoted)
    tracking.set_version_tags(client, name, version, {DECISION_TAG: reason})
    say = log.info if holder == version else log.warning
    say("%s version %s %s champion: %s", name, version,
        "is" if holder == version else "is registered but not", reason)
    return ChampionDecision(name, version, score, holder == version, reason, holder)
