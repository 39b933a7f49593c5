"""errors.py: telling an interrupt from a failure, however the interrupt surfaces."""

from __future__ import annotations

import pytest

from atari_vae.errors import interrupted


def _raised(first: BaseException, then: BaseException | None, *,
            as_cause: bool = True) -> BaseException:
    """What surfaces when ``then`` is raised while ``first`` is handled (``from first``, or only
    in its context with ``as_cause=False``); ``first`` itself when ``then`` is None."""
    try:
        try:
            raise first
        except BaseException as exc:
            if then is None:
                raise
            raise then from (exc if as_cause else None)
    except BaseException as surfaced:  # the test inspects whatever surfaced
        return surfaced


@pytest.mark.parametrize("first, then, as_cause, expected", [
    (KeyboardInterrupt("signal 15"), ImportError("initialization failed"), True, True),
    # no cause, but still the interrupt's context
    (KeyboardInterrupt("signal 1"), OSError("flush failed"), False, True),
    (KeyboardInterrupt(), None, True, True),
    (ValueError("first"), ImportError("second"), True, False),
    (ImportError("plain"), None, True, False),
], ids=["import-interrupted-by-a-signal", "error-while-handling-an-interrupt", "interrupt",
        "error-while-handling-an-error", "plain-import-error"])
def test_an_interrupt_is_recognised_behind_the_exception_it_caused(first, then, as_cause,
                                                                   expected):
    assert interrupted(_raised(first, then, as_cause=as_cause)) is expected


def test_a_cyclic_exception_chain_ends_the_search():
    first, second = ValueError("a"), ValueError("b")
    first.__context__, second.__context__ = second, first
    assert interrupted(first) is False
