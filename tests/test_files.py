"""Atomic writes and the clean-up of what a killed writer left behind."""

from __future__ import annotations

from atari_vae.files import atomic_path, remove_partial_files


def test_a_temporary_is_found_by_the_clean_up_and_the_target_appears_only_when_whole(tmp_path):
    target = tmp_path / "best_model.pt"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"weights")
        assert not target.exists()
        assert remove_partial_files(tmp_path) == [tmp]  # what a restart after SIGKILL sees
        tmp.write_bytes(b"weights")
    assert target.read_bytes() == b"weights"
    assert remove_partial_files(tmp_path) == []
