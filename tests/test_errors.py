"""errors.py: telling an interrupt from a failure, however the interrupt surfaces."""

from __future__ import annotations

import pytest

from atari_vae.errors import interrupted


def _caught(raise_it) -> BaseException:
    try:
        raise_it()
    except BaseException as exc:  # the test inspects whatever was raised
        return exc
    raise AssertionError("nothing was raised")


def _import_interrupted_by_a_signal() -> None:
    try:
        raise KeyboardInterrupt("signal 15")
    except KeyboardInterrupt as exc:
        raise ImportError("initialization failed") from exc


def _error_while_handling_an_interrupt() -> None:
    try:
        raise KeyboardInterrupt("signal 1")
    except KeyboardInterrupt:
        raise OSError("flush failed") from None  # no cause, but still the interrupt's context


def _interrupt() -> None:
    raise KeyboardInterrupt


def _plain_import_error() -> None:
    raise ImportError("plain")


def _error_while_handling_an_error() -> None:
    try:
        raise ValueError("first")
    except ValueError as exc:
        raise ImportError("second") from exc


@pytest.mark.parametrize("raise_it, expected", [
    (_import_interrupted_by_a_signal, True),
    (_error_while_handling_an_interrupt, True),
    (_interrupt, True),
    (_error_while_handling_an_error, False),
    (_plain_import_error, False),
])
def test_an_interrupt_is_recognised_behind_the_exception_it_caused(raise_it, expected):
    assert interrupted(_caught(raise_it)) is expected


def test_a_cyclic_exception_chain_ends_the_search():
    first, second = ValueError("a"), ValueError("b")
    first.__context__, second.__context__ = second, first
    assert interrupted(first) is False
