"""A run's hold on its output directory: the lock, the token, the refusal of a taken directory."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atari_vae.errors import AtariVaeError, ConfigError
from atari_vae.rundir import RUN_TOKEN_FILE, check_fresh, claimed, recorded_token
from tests.conftest import REPO

HOLDER = """
import sys, time
from pathlib import Path
from atari_vae.rundir import claimed
with claimed(Path(sys.argv[1]), resume=False):
    print("held", flush=True)
    time.sleep(600)
"""


def _hold(out: Path) -> subprocess.Popen:
    """Another process that claims ``out`` and keeps it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_directory_claimed_by_a_live_process_is_refused_and_free_once_it_is_killed(tmp_path):
    proc = _hold(tmp_path)
    try:
        for resume in (False, True):
            with pytest.raises(AtariVaeError, match="is in use by another training run"), \
                    claimed(tmp_path, resume):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)  # no clean-up runs: the OS must release the lock
        proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while True:
        try:
            with claimed(tmp_path, resume=True) as token:
                break
        except AtariVaeError:
            assert time.monotonic() < deadline, "the lock outlived the killed process"
            time.sleep(0.05)
    assert token == recorded_token(tmp_path) and len(token) == 32


def test_a_fresh_claim_records_a_new_token_and_a_resume_keeps_it(tmp_path):
    with claimed(tmp_path, resume=False) as first:
        assert (tmp_path / RUN_TOKEN_FILE).read_text() == first
    with claimed(tmp_path, resume=True) as again:
        assert again == first
    with claimed(tmp_path, resume=False) as second:  # no models yet: the directory is free
        assert second != first and recorded_token(tmp_path) == second


@pytest.mark.parametrize("name", ["checkpoint_epoch_3.pt", "best_model.pt", "final_model.pt"])
def test_a_directory_holding_a_runs_models_is_refused_to_a_fresh_run(tmp_path, name):
    (tmp_path / "training_curves.png").write_bytes(b"a plot is no model")
    check_fresh(tmp_path)
    (tmp_path / name).write_bytes(b"weights")
    with pytest.raises(ConfigError, match=f"already holds a training run \\({name}\\); "
                                          f"continue it with --resume"):
        check_fresh(tmp_path)
    with pytest.raises(ConfigError), claimed(tmp_path, resume=False):
        pass
