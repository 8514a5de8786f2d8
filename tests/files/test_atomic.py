"""Atomic writes: complete file or nothing, no temp files left, no silent overwrite."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from convfactor.errors import ConvfactorError
from convfactor.files.atomic import (
    OutputExistsError,
    StagedOutputs,
    atomic_torch_save,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
)


def _names(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_writes_the_content_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "out.bin"
    assert atomic_write_bytes(target, b"\x00abc") == target
    assert target.read_bytes() == b"\x00abc"
    atomic_write_text(tmp_path / "out.txt", "héllo")
    assert (tmp_path / "out.txt").read_text(encoding="utf-8") == "héllo"
    assert _names(tmp_path) == ["out.bin", "out.txt"]


def test_existing_file_is_not_overwritten_without_force(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(OutputExistsError) as info:
        atomic_write_bytes(target, b"new")
    assert isinstance(info.value, ConvfactorError) and isinstance(info.value, FileExistsError)
    assert "force" in str(info.value) and "\n" not in str(info.value)
    assert target.read_bytes() == b"old"
    atomic_write_bytes(target, b"new", force=True)
    assert target.read_bytes() == b"new"
    assert _names(tmp_path) == ["out.bin"]


def test_the_writer_is_not_called_when_the_file_exists(tmp_path):
    (tmp_path / "out.bin").write_bytes(b"old")
    calls = []
    with pytest.raises(OutputExistsError):
        atomic_write(tmp_path / "out.bin", calls.append)
    assert calls == []


def _fail_midway(temp):
    with open(temp, "wb") as handle:
        handle.write(b"partial")
        handle.flush()
    raise OSError("disk full")


def test_failure_mid_write_leaves_no_file_and_no_temp_file(tmp_path):
    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "out.bin", _fail_midway)
    assert _names(tmp_path) == []


def test_failure_mid_overwrite_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, _fail_midway, force=True)
    assert target.read_bytes() == b"old"
    assert _names(tmp_path) == ["out.bin"]


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("this object cannot be saved")


def test_torch_save_round_trip_and_failure(tmp_path):
    target = tmp_path / "state.pt"
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    atomic_torch_save(state, target)
    assert torch.equal(torch.load(target)["w"], state["w"])
    with pytest.raises(RuntimeError, match="cannot be saved"):  # torch.save fails part way through
        atomic_torch_save({"w": state["w"], "bad": _Unpicklable()}, tmp_path / "bad.pt")
    assert _names(tmp_path) == ["state.pt"]


def test_file_created_by_someone_else_meanwhile_is_not_overwritten(tmp_path):
    target = tmp_path / "out.bin"

    def writer_racing_another_process(temp):
        temp.write_bytes(b"mine")
        target.write_bytes(b"theirs")  # appears after the existence check, before the move

    with pytest.raises(OutputExistsError):
        atomic_write(target, writer_racing_another_process)
    assert target.read_bytes() == b"theirs"
    assert _names(tmp_path) == ["out.bin"]


def test_new_file_gets_the_usual_permissions(tmp_path):
    old_umask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "out.bin", b"x")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "out.bin").stat().st_mode) == 0o644


def test_bad_destinations_are_user_errors(tmp_path):
    with pytest.raises(ConvfactorError, match="does not exist"):
        atomic_write_bytes(tmp_path / "missing" / "out.bin", b"x")
    with pytest.raises(ConvfactorError, match="directory"):
        atomic_write_bytes(tmp_path, b"x", force=True)
    assert _names(tmp_path) == []


def test_a_set_of_outputs_is_published_whole_or_not_at_all(tmp_path):
    first, second = tmp_path / "model.pt", tmp_path / "model.report.json"
    with StagedOutputs(force=False) as staged:
        staged.write(first, lambda p: p.write_text("model"))
        staged.write(second, lambda p: p.write_text("report"))
        second.write_text("someone else's")  # appears after the checks, before the commit
        with pytest.raises(OutputExistsError, match="model.report.json exists"):
            staged.commit()
    assert _names(tmp_path) == ["model.report.json"]  # model.pt, published first, was taken back
    assert second.read_text() == "someone else's"
    with StagedOutputs(force=False) as staged:
        staged.write(first, lambda p: p.write_text("model"))
        staged.commit()
    assert _names(tmp_path) == ["model.pt", "model.report.json"] and first.read_text() == "model"
