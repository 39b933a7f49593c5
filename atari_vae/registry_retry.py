"""Bounded retries against the model registry, telling "the store did not answer" from "the
store answered no". Promotion uses them: a store that does not answer aborts, changing nothing."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from atari_vae import tracking
from atari_vae.errors import AtariVaeError
from atari_vae.files import first_line

T = TypeVar("T")

FETCH_ATTEMPTS = 3
FETCH_BACKOFF_S = 2.0


class PromotionAborted(AtariVaeError):
    """The registry did not answer: nothing was promoted or demoted."""


def is_not_found(exc: BaseException) -> bool:
    """True when the store answered that the model, version or alias does not exist."""
    return getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def is_network_error(exc: BaseException | None) -> bool:
    """True when ``exc`` or its causes say the tracking server or network did not answer."""
    import requests

    while exc is not None:
        if isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError,
                            TimeoutError)):
            return True
        if any(s in str(exc) for s in ("API request to", "Max retries exceeded",
                                       "cannot reach the MLflow tracking server")):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def with_retry(what: str, call: Callable[[], T],
               transient: Callable[[Exception], bool] | None = None) -> T:
    """``call()``, tried FETCH_ATTEMPTS times while it fails ``transient`` (default: anything
    but "does not exist", which is an answer); then PromotionAborted."""
    transient = transient or (lambda exc: not is_not_found(exc))
    for attempt in range(FETCH_ATTEMPTS):
        try:
            return call()
        except Exception as exc:
            if not transient(exc):
                raise
            last = exc
            if attempt + 1 < FETCH_ATTEMPTS:
                time.sleep(FETCH_BACKOFF_S * (attempt + 1))
    raise PromotionAborted(
        f"cannot {what} from {tracking.tracking_uri()} after {FETCH_ATTEMPTS} tries "
        f"({first_line(last)}); the promotion is aborted and the champion alias is unchanged")
