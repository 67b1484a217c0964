"""A fresh run never rotates or resumes into an earlier run's checkpoints."""

from dtl_kernels.train import checkpoint as ckpt


def test_earlier_checkpoints_are_moved_aside_not_deleted(tmp_path):
    folder = ckpt.checkpoint_dir(tmp_path)
    folder.mkdir(parents=True)
    for epoch in (9, 10):
        (folder / f"epoch_{epoch:04d}.pt").write_bytes(b"old run")
    assert len(ckpt.list_checkpoints(tmp_path)) == 2
    moved = ckpt.set_aside(tmp_path)
    assert ckpt.list_checkpoints(tmp_path) == []
    assert sorted(p.name for p in moved.iterdir()) == ["epoch_0009.pt", "epoch_0010.pt"]
    folder.mkdir()
    (folder / "epoch_0001.pt").write_bytes(b"second run")
    assert ckpt.set_aside(tmp_path).name.endswith(".old-2")
