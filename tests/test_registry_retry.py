"""Bounded retries against the registry: a transient failure is retried, an answer is not."""

from __future__ import annotations

import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

from atari_vae import registry_retry
from atari_vae.registry_retry import PromotionAborted, is_network_error, with_retry


class Flaky:
    """A call that fails with ``error`` ``failures`` times, then answers ``"answer"``."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "answer"


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_retry, "FETCH_BACKOFF_S", 0.0)


def test_a_call_that_fails_twice_then_answers_is_answered_on_the_third_try():
    call = Flaky(2, ConnectionError("refused"))
    assert with_retry("read the champion", call) == "answer"
    assert call.calls == 3


def test_the_waits_grow_between_tries_and_none_follows_the_last(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(registry_retry, "FETCH_BACKOFF_S", 2.0)
    monkeypatch.setattr(registry_retry.time, "sleep", waits.append)
    with pytest.raises(PromotionAborted):
        with_retry("read the champion", Flaky(99, TimeoutError("timed out")))
    assert waits == [2.0, 4.0]


def test_a_call_that_never_answers_aborts_after_the_set_tries_with_its_first_line():
    call = Flaky(99, ConnectionError("refused\nand a long traceback"))
    with pytest.raises(PromotionAborted, match=r"cannot read the champion from .* after 3 tries "
                                               r"\(refused\); the promotion is aborted"):
        with_retry("read the champion", call)
    assert call.calls == registry_retry.FETCH_ATTEMPTS


def test_does_not_exist_is_an_answer_and_is_raised_at_once():
    missing = MlflowException("no such model", error_code=RESOURCE_DOES_NOT_EXIST)
    call = Flaky(99, missing)
    with pytest.raises(MlflowException, match="no such model"):
        with_retry("read the champion", call)
    assert call.calls == 1


def test_a_custom_transient_rule_retries_only_what_it_names():
    call = Flaky(99, ValueError("corrupt file"))
    with pytest.raises(ValueError, match="corrupt file"):
        with_retry("fetch the files", call, transient=is_network_error)
    assert call.calls == 1


def test_a_network_error_is_found_through_the_cause_chain():
    try:
        try:
            raise requests.ConnectionError("connection refused")
        except requests.ConnectionError as cause:
            raise MlflowException("download failed") from cause
    except MlflowException as exc:
        assert is_network_error(exc)
    assert not is_network_error(ValueError("bad checksum"))
    assert not is_network_error(None)
