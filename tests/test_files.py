"""Atomic writes and the clean-up of what a killed writer left behind."""

from __future__ import annotations

import pytest

from atari_vae.files import atomic_path, first_line, remove_partial_files


def test_a_temporary_is_found_by_the_clean_up_and_the_target_appears_only_when_whole(tmp_path):
    target = tmp_path / "best_model.pt"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"weights")
        assert not target.exists()
        assert remove_partial_files(tmp_path) == [tmp]  # what a restart after SIGKILL sees
        tmp.write_bytes(b"weights")
    assert target.read_bytes() == b"weights"
    assert remove_partial_files(tmp_path) == []


@pytest.mark.parametrize("exc, line", [
    (EOFError("No data left in file"), "No data left in file"),
    (ValueError("first\nsecond"), "first"),
    (EOFError(), "EOFError"),
    (RuntimeError("<html>" + "x" * 500), "<html>" + "x" * 294),
])
def test_first_line_of_an_error_is_one_line_never_empty(exc, line):
    assert first_line(exc) == line
