"""The on-disk frame store and FrameRows, on synthetic frames (no emulator needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from atari_vae.store import (
    FRAMES_FILE,
    INDEX_FILE,
    SORTED_FILE,
    FrameRows,
    FrameStore,
    StoreError,
)


def _episode(length: int, value: int) -> np.ndarray:
    frames = np.full((length, 3, 64, 64), value, dtype=np.uint8)
    frames[:, 0, 0, 0] = np.arange(length)  # each frame its own
    return frames


def _filled(path: Path, lengths: list[int], complete: bool = True) -> FrameStore:
    store = FrameStore.create(path, "key")
    for number, length in enumerate(lengths):
        store.append(number, _episode(length, number + 1))
    if complete:
        store.finish()
    return store


def test_a_store_reopens_with_its_episodes_frames_ids_and_steps(tmp_path):
    _filled(tmp_path / "s", [3, 1, 2])
    store = FrameStore.open(tmp_path / "s", "key")
    assert store.complete and store.episode_lengths == [3, 1, 2]
    frames = store.frames()
    assert frames.shape == (6, 3, 64, 64) and frames.dtype == torch.uint8
    assert torch.equal(frames, torch.from_numpy(np.concatenate(
        [_episode(3, 1), _episode(1, 2), _episode(2, 3)])))
    assert store.episode_ids().tolist() == [0, 0, 0, 1, 2, 2]
    assert store.steps().tolist() == [0, 1, 2, 0, 0, 1]


def test_a_torn_append_is_cut_off_and_the_store_continues_after_the_last_whole_episode(tmp_path):
    _filled(tmp_path / "s", [2, 2], complete=False)
    with open(tmp_path / "s" / FRAMES_FILE, "ab") as fh:  # killed halfway through episode 2
        fh.write(_episode(2, 9).tobytes()[:5000])
    store = FrameStore.open(tmp_path / "s", "key")
    assert store.episode_lengths == [2, 2] and not store.complete
    store.append(2, _episode(1, 3))
    store.finish()
    assert torch.equal(FrameStore.open(tmp_path / "s", "key").frames()[4],
                       torch.from_numpy(_episode(1, 3)[0]))


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / INDEX_FILE).unlink(), "unreadable index"),
    (lambda p: (p / INDEX_FILE).write_text("{"), "unreadable index"),
    (lambda p: (p / FRAMES_FILE).write_bytes(b"x" * 100), "holds 100 bytes"),
    (lambda p: (p / FRAMES_FILE).write_bytes((p / FRAMES_FILE).read_bytes() + b"x"),
     "where the index needs"),
    (lambda p: (p / INDEX_FILE).write_text(json.dumps(
        {**json.loads((p / INDEX_FILE).read_text()), "version": 99})), "not a version-1"),
    (lambda p: (p / INDEX_FILE).write_text(json.dumps(
        {**json.loads((p / INDEX_FILE).read_text()), "episode_lengths": [2, 0]})),
     "not a version-1"),
    (lambda p: (p / INDEX_FILE).write_text(json.dumps(
        {**json.loads((p / INDEX_FILE).read_text()), "episode_numbers": [1, 1]})),
     "not a version-1"),
    (lambda p: (p / INDEX_FILE).write_text(json.dumps(
        {**json.loads((p / INDEX_FILE).read_text()), "frames_file": "../../etc/passwd"})),
     "not a version-1"),
])
def test_a_damaged_store_is_refused_with_a_one_line_reason(tmp_path, damage, message):
    _filled(tmp_path / "s", [2, 2])
    damage(tmp_path / "s")
    with pytest.raises(StoreError, match=message) as caught:
        FrameStore.open(tmp_path / "s", "key")
    assert "\n" not in str(caught.value)


def test_episodes_stored_as_they_ended_are_put_in_number_order_when_the_store_finishes(
        tmp_path):
    store = FrameStore.create(tmp_path / "s", "key")
    for number, length in [(2, 3), (0, 1), (1, 2)]:
        store.append(number, _episode(length, number + 1))
    store.finish()
    reopened = FrameStore.open(tmp_path / "s", "key")
    assert reopened.episode_numbers == [0, 1, 2] and reopened.episode_lengths == [1, 2, 3]
    assert torch.equal(reopened.frames(), torch.from_numpy(np.concatenate(
        [_episode(1, 1), _episode(2, 2), _episode(3, 3)])))
    assert reopened.episode_ids().tolist() == [0, 1, 1, 2, 2, 2]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted([INDEX_FILE, SORTED_FILE])


def test_a_sort_cut_short_leaves_the_unsorted_store_whole(tmp_path):
    store = FrameStore.create(tmp_path / "s", "key")
    store.append(1, _episode(2, 2))
    store.append(0, _episode(1, 1))
    (tmp_path / "s" / SORTED_FILE).write_bytes(b"half a sort")  # killed while sorting
    reopened = FrameStore.open(tmp_path / "s", "key")
    assert reopened.episode_numbers == [1, 0] and not reopened.complete
    assert not (tmp_path / "s" / SORTED_FILE).exists()
    reopened.finish()
    assert torch.equal(FrameStore.open(tmp_path / "s", "key").frames()[0],
                       torch.from_numpy(_episode(1, 1)[0]))


def test_a_store_of_another_key_is_refused(tmp_path):
    _filled(tmp_path / "s", [2])
    with pytest.raises(StoreError, match="for other-key"):
        FrameStore.open(tmp_path / "s", "other-key")


def test_frame_rows_index_like_the_tensor_of_their_rows():
    a = torch.arange(5 * 3 * 64 * 64).reshape(5, 3, 64, 64).to(torch.uint8)
    b = (255 - torch.arange(4 * 3 * 64 * 64) % 256).reshape(4, 3, 64, 64).to(torch.uint8)
    whole = torch.cat([a, b])
    rows = FrameRows.concat([a, FrameRows.of(b)])
    assert len(rows) == 9 and rows.shape == whole.shape
    for index in (torch.tensor([8, 0, 4, 5, 5]), slice(2, 7), torch.arange(9) % 2 == 0, 6):
        assert torch.equal(rows[index], whole[index])
    mask = torch.tensor([True, False, True, True, False, True, False, True, True])
    picked = FrameRows.of(rows, mask)  # rows of rows: still no copy
    assert torch.equal(picked[:], whole[mask]) and len(picked) == int(mask.sum())
    assert torch.equal(picked[torch.tensor([4, 1])], whole[mask][torch.tensor([4, 1])])
    assert torch.equal(picked[3], whole[mask][3]) and torch.equal(picked[-1], whole[mask][-1])
    assert rows.to("cpu") is rows


def test_frame_rows_of_a_store_hold_no_copy_of_its_frames(tmp_path):
    store = _filled(tmp_path / "s", [50, 50])
    frames = store.frames()
    half = FrameRows.of(frames, torch.arange(100) % 2 == 1)
    assert half.sources[0].data_ptr() == frames.data_ptr()
    assert torch.equal(half[torch.tensor([0, 49])], frames[torch.tensor([1, 99])])
