"""Shared trainer plumbing: checkpoints that survive kills but not setting changes."""

from brainvq.runtime import archive_stale_checkpoints
def test_checkpoints_survive_a_rerun_with_the_same_settings(tmp_path):
    ckpt = tmp_path / "checkpoints"
    assert archive_stale_checkpoints(ckpt, {"steps": 10}) is None
    (ckpt / "last.pt").write_bytes(b"x")
    assert archive_stale_checkpoints(ckpt, {"steps": 10}) is None
    assert (ckpt / "last.pt").exists()


def test_checkpoints_from_other_settings_are_moved_aside_not_deleted(tmp_path):
    ckpt = tmp_path / "checkpoints"
    archive_stale_checkpoints(ckpt, {"steps": 10})
    (ckpt / "last.pt").write_bytes(b"x")
    archived = archive_stale_checkpoints(ckpt, {"steps": 20})
    assert archived == tmp_path / "checkpoints-stale-1"
    assert (archived / "last.pt").read_bytes() == b"x"
    assert not (ckpt / "last.pt").exists()
    (ckpt / "last.pt").write_bytes(b"y")
    assert archive_stale_checkpoints(ckpt, {"steps": 30}) == tmp_path / "checkpoints-stale-2"
