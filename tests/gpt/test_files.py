"""Atomic writes (gpt/files.py): a full disk is one clear error and the previous file survives."""
import errno
import os
import shutil
import subprocess
import sys
from collections import namedtuple

import pytest
import torch

from gpt.errors import USER_ERRORS, DiskFullError
from gpt.files import atomic_open, atomic_write_text
from train.checkpoint import save_checkpoint


def test_a_full_disk_is_one_error_naming_the_path_and_the_previous_file_survives(tmp_path):
    target = tmp_path / "shard.bin"
    atomic_write_text(target, "old")

    class Full:  # a writer that hits ENOSPC after some bytes, as write(2) does on a full disk
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:3])
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError) as e:
        with atomic_open(target, "wb") as f:
            Full(f).write(b"new contents")
    msg = str(e.value)
    assert str(tmp_path) in msg and "shard.bin" in msg and "intact" in msg and "make room" in msg
    assert isinstance(e.value, USER_ERRORS)  # the CLIs print it as one line
    assert target.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["shard.bin"]  # no temp file left behind


def test_torch_save_failing_on_a_full_disk_is_a_disk_full_error(tmp_path, monkeypatch):
    """torch.save reports a failed write as RuntimeError ("unexpected pos ..."), not ENOSPC: with the disk
    full at that moment it is the same one-line error; with space left it stays what it was."""
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint({"iter": 1}, ckpt)
    Usage = namedtuple("Usage", "total used free")

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662")

    monkeypatch.setattr(torch, "save", failing_save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 << 30, 10 << 30, 4096))
    with pytest.raises(DiskFullError, match="ckpt.pt"):
        save_checkpoint({"iter": 2}, ckpt)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 << 30, 1 << 30, 9 << 30))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        save_checkpoint({"iter": 2}, ckpt)
    monkeypatch.undo()
    assert torch.load(ckpt)["iter"] == 1
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None,
                    reason="mounting a small tmpfs needs root on Linux")
def test_a_checkpoint_on_a_really_full_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("this container cannot mount a tmpfs (no CAP_SYS_ADMIN)")
    try:
        save_checkpoint({"w": torch.zeros(1000)}, mnt / "ckpt.pt")
        with pytest.raises(DiskFullError, match=r"ckpt\.pt: it had reached .* when the disk filled"):
            save_checkpoint({"w": torch.zeros(1_000_000)}, mnt / "ckpt.pt")
        assert torch.load(mnt / "ckpt.pt")["w"].shape == (1000,)
        assert os.listdir(mnt) == ["ckpt.pt"]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
