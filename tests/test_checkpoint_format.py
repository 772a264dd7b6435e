"""The checkpoint format's own reader and writer: safetensors written from the tensors' memory and read back
into new tensors, checksums, the durable commit's order, and checkpoints of format 1 (SHA-256)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import cadence.checkpoint.format as ckpt_format
from cadence.checkpoint import CheckpointError, read_tensors, verify, write_checkpoint
from helpers import CrashAt
from resume_worker import StartedAt, build

pytestmark = pytest.mark.usefixtures("one_thread")


def sample_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "f32": torch.randn(3, 5),
        "f64": torch.randn(4, dtype=torch.float64),
        "bf16": torch.randn(7, dtype=torch.bfloat16),
        "f16": torch.randn(2, 3, dtype=torch.float16),
        "i64": torch.arange(5),
        "i32 scalar": torch.tensor(7, dtype=torch.int32),
        "u8": torch.arange(9, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 4),
        "strided": torch.randn(4, 6)[:, ::2],  # not contiguous: written as its values
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def test_tensors_round_trip_and_the_safetensors_library_reads_them(tmp_path):
    tensors = sample_tensors()
    folder = write_checkpoint(tmp_path / "ckpt", {"t.safetensors": tensors, "meta.json": {"a": [1, 2]}})
    assert_same(load_file(folder / "t.safetensors"), tensors)  # a standard file
    assert_same(read_tensors(folder / "t.safetensors"), tensors)  # read without verify
    verify(folder)
    assert_same(read_tensors(folder / "t.safetensors"), tensors)  # what verify kept


def test_files_the_library_wrote_are_read(tmp_path):
    tensors = {k: v.contiguous() for k, v in sample_tensors().items()}
    save_file(tensors, tmp_path / "lib.safetensors", metadata={"by": "the library"})
    assert_same(read_tensors(tmp_path / "lib.safetensors"), tensors)


def damaged_header(data: bytes) -> bytes:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 4  # past the next tensor's start
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + length:]


@pytest.mark.parametrize("damage", [
    pytest.param(lambda d: d[: len(d) - 5], id="truncated"),
    pytest.param(lambda d: struct.pack("<Q", 2**40) + d[8:], id="header-length-past-the-end"),
    pytest.param(lambda d: d[:8] + b"[" + d[9:], id="header-not-json"),
    pytest.param(damaged_header, id="overlapping-offsets"),
    pytest.param(lambda d: b"\x80\x02}q\x00." + d, id="pickle-prefix"),
])
def test_a_damaged_tensor_file_is_refused(tmp_path, damage):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.randn(8), "b": torch.randn(3)}, path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        read_tensors(path)


def test_a_file_replaced_after_verify_is_read_again(tmp_path):
    folder = write_checkpoint(tmp_path / "ckpt", {"t.safetensors": {"w": torch.zeros(3)}})
    verify(folder)
    os.replace(write_checkpoint(tmp_path / "other", {"t.safetensors": {"w": torch.ones(3)}}) / "t.safetensors",
               folder / "t.safetensors")
    assert torch.equal(read_tensors(folder / "t.safetensors")["w"], torch.ones(3))


def test_verify_reads_each_file_once(tmp_path, monkeypatch):
    folder = write_checkpoint(tmp_path / "ckpt", {"a.safetensors": {"w": torch.randn(4)}, "b.json": {"x": 1}})
    verify(folder)
    opened: list[str] = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    assert read_tensors(folder / "a.safetensors").keys() == {"w"}
    assert ckpt_format.read_json(folder / "b.json") == {"x": 1}
    assert opened == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="names the fsynced files through /proc")
def test_every_file_and_the_folder_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(("rename", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    folder = write_checkpoint(tmp_path / "ckpt", {"a.safetensors": {"w": torch.randn(4)}, "b.json": {"x": 1}})
    monkeypatch.undo()
    rename = events.index(("rename", str(ckpt_format.temp_folder(folder))))
    tmp = str(ckpt_format.temp_folder(folder))
    before = {path for kind, path in events[:rename] if kind == "fsync"}
    assert before == {tmp, f"{tmp}/a.safetensors", f"{tmp}/b.json", f"{tmp}/manifest.json"}
    assert events[rename + 1:] == [("fsync", str(tmp_path))]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts open files through /proc")
@pytest.mark.parametrize("nth", [1, 3])  # the fsync done in the calling thread, one done in a pool thread
def test_a_failed_fsync_leaves_no_checkpoint_and_no_open_file(tmp_path, monkeypatch, nth):
    real_fsync, calls = os.fsync, []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == nth:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    files = {"a.safetensors": {"w": torch.randn(4)}, "b.json": {"x": 1}, "c.safetensors": {"v": torch.ones(2)}}
    write_checkpoint(tmp_path / "ckpt" / "step-1", files)  # the fsync threads exist before counting open files
    before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output"):
        write_checkpoint(tmp_path / "ckpt" / "step-2", files)
    monkeypatch.undo()
    assert len(calls) == 5  # every file, the manifest and the folder: all waited for, none left running
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-1"]  # no step-2, no temporary folder
    assert len(os.listdir("/proc/self/fd")) == before


def as_format_1(folder: Path) -> None:
    """Rewrite a checkpoint as cadence wrote it before format 2: safetensors from the library, SHA-256."""
    for path in folder.glob("*.safetensors"):
        save_file(load_file(path), path)
    meta = json.loads((folder / "trainer.json").read_text())
    (folder / "trainer.json").write_text(json.dumps({**meta, "format": 1}, indent=1, sort_keys=True))
    files = {}
    for path in sorted(folder.iterdir()):
        if path.name != "manifest.json":
            data = path.read_bytes()
            files[path.name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format": 1, "files": files}))


def test_a_checkpoint_of_format_1_resumes_exactly(tmp_path):
    reference = build(tmp_path / "reference", max_steps=12)
    reference.fit()
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(run, max_steps=12, checkpoint_every=3, callbacks=[CrashAt(10)]).fit()
    folder = run / "checkpoints" / "step-000000009"
    as_format_1(folder)
    assert "sha256" in verify(folder)["files"]["model.safetensors"]
    started = StartedAt()
    resumed = build(run, max_steps=12, checkpoint_every=3, resume="auto", callbacks=[started])
    resumed.fit()
    assert started.steps == [9]
    assert_same(resumed.model.state_dict(), reference.model.state_dict())


def test_a_format_1_checkpoint_with_a_flipped_bit_is_skipped(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(run, max_steps=12, checkpoint_every=3, callbacks=[CrashAt(10)]).fit()
    folder = run / "checkpoints" / "step-000000009"
    as_format_1(folder)
    data = bytearray((folder / "optimizer.safetensors").read_bytes())
    data[-2] ^= 0x01
    (folder / "optimizer.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.safetensors does not match its checksum"):
        verify(folder)
