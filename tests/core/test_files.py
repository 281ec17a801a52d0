"""Atomic writes: a reader sees the old file or the whole new one, and nothing is left behind."""

from __future__ import annotations

import os
import stat

import pytest

from tvm_cim.core import files


def test_a_finished_write_replaces_the_target_with_default_permissions(tmp_path):
    target = tmp_path / "sub" / "report.json"
    files.write_text(target, "old")
    with files.atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".json" and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"  # untouched until the writer finishes
    assert target.read_text() == "new"
    assert list(target.parent.iterdir()) == [target]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_a_failed_write_leaves_the_old_file_and_no_debris(tmp_path):
    target = tmp_path / "w8a8.pt"
    files.write_bytes(target, b"complete checkpoint")
    with pytest.raises(KeyboardInterrupt), files.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt  # a kill in the middle of the write
    assert target.read_bytes() == b"complete checkpoint"
    assert list(tmp_path.iterdir()) == [target]


def test_a_failed_first_write_creates_nothing(tmp_path):
    with pytest.raises(ValueError), files.atomic_path(tmp_path / "table.npz") as tmp:
        tmp.write_bytes(b"partial")
        raise ValueError("writer failed")
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_interrupted_while_saving_keeps_the_previous_one(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from tvm_cim.learn import train, zoo

    model = zoo.build("digits-mlp")
    result = train.StageResult("fp32", "digits-mlp", "digits", None, 0.0, 0.0, 0.0)
    path = train.save_checkpoint(model, result, tmp_path / "fp32.pt")
    before = path.read_bytes()

    def killed(obj, f):
        with open(f, "wb") as out:
            out.write(b"\x80")  # the first byte of a pickle, then nothing
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(model, result, path)
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]
    train.load_checkpoint(path, "digits-mlp")


def test_folder_problem_names_the_blocking_path(tmp_path):
    from tvm_cim.core.files import folder_problem

    assert folder_problem(tmp_path / "new" / "deeper") == ""
    (tmp_path / "a-file").write_text("")
    assert folder_problem(tmp_path / "a-file" / "sub") == f"{tmp_path / 'a-file'} is not a folder"


def test_remove_temporaries_takes_only_the_writers_leftovers(tmp_path):
    from tvm_cim.core.files import remove_temporaries

    target = tmp_path / "table.npz"
    left = tmp_path / ".table.npz.k3j9x.npz"
    kept = [tmp_path / "table.npz", tmp_path / ".other.npz.k3j9x.npz", tmp_path / "x.npz"]
    for path in [left, *kept]:
        path.write_bytes(b"")
    remove_temporaries(target)
    assert not left.exists() and all(p.exists() for p in kept)
