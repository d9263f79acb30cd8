"""Atomic writes: complete files or none, and temporaries of killed writers cleaned by the next write."""

import os
import subprocess
import sys

import pytest

from brainvq.files import atomic_path, remove_stale_temporaries, temporary_sibling, write_text_atomic


def dead_pid() -> int:
    """The id of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_a_folder_replaces_the_old_folder_only_when_complete(tmp_path):
    target = tmp_path / "codes"
    (target / "a").mkdir(parents=True)
    with atomic_path(target) as tmp:
        (tmp / "b").mkdir(parents=True)
        assert (target / "a").exists()
    assert [p.name for p in target.iterdir()] == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["codes"]


def test_the_next_write_removes_temporaries_of_dead_writers_and_keeps_live_ones(tmp_path):
    target = tmp_path / "SUBJ001.nii.gz"
    dead = tmp_path / f".SUBJ001.nii.gz.tmp-{dead_pid()}.nii.gz"
    live = temporary_sibling(target, ".nii.gz").with_name(f".SUBJ001.nii.gz.tmp-{os.getppid()}.nii.gz")
    other = tmp_path / f".SUBJ0011.nii.gz.tmp-{dead_pid()}"
    for path in (dead, live, other):
        path.write_text("x")
    write_text_atomic(target, "volume")
    assert target.read_text() == "volume"
    assert not dead.exists()
    assert live.exists() and other.exists()  # a running writer's file, and another path's, are left alone
    assert remove_stale_temporaries(target) == []
