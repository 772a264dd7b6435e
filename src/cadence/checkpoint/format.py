"""The on-disk format of one checkpoint folder, and its atomic commit.

A checkpoint is a folder of ``*.safetensors`` and ``*.json`` files plus ``manifest.json``, which lists the
size and checksum of every other file (XXH3-128 since format 2, SHA-256 in format 1; both are read). It is
written into a hidden temporary folder beside its final place: every file is written (hashed on the way
out), then all of them and the folder are fsynced, then it is renamed into place and the parent fsynced. A crash
at any moment leaves either the complete checkpoint or no checkpoint (a stray temporary folder, ignored and
cleaned up later). Reading never unpickles anything: tensors come from safetensors, everything else from JSON.

``verify`` reads each file once, checking it as it reads; what it read is kept (up to ``KEEP_BYTES``) for the
``read_tensors``/``read_json`` calls that load the same files next, so a resume reads every byte once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors.torch import load as load_safetensors

from .. import killpoints
from .disk import Unsynced, fsync_dir
from .tensorfile import NotParsed, TensorFile, encode_tensors, read_tensor_file

MANIFEST = "manifest.json"
FORMAT = 2  # 2: XXH3-128 checksums in the manifest; 1: SHA-256 (still read)
TMP_PREFIX = ".tmp-"
# XXH3-128 checks 96 MB in ~5 ms where SHA-256 takes ~60-100 ms, more than torch.load reading the same bytes.
# Neither is a signature: whoever can change a file can change the manifest too.
CHECKSUMS = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}
CHECKSUM = "xxh3_128"
KEEP_BYTES = 2 * 2**30  # what verify keeps for the loads that follow, at most (more is read again)


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, corrupt, or does not fit this run."""


# ------------------------------------------------------------------------------------------------ writing
def encode(files: Mapping[str, Any]) -> dict[str, TensorFile | bytes]:
    """File contents: ``dict[str, Tensor]`` -> a safetensors file, anything else -> JSON bytes."""
    out: dict[str, TensorFile | bytes] = {}
    for name, content in files.items():
        if name.endswith(".safetensors"):
            out[name] = encode_tensors(content)
        else:
            # one line: json's C encoder does not indent, and indenting in Python cost 0.1 ms of a small save
            out[name] = json.dumps(content, sort_keys=True).encode()
    return out


def _write(path: Path, data: TensorFile | bytes) -> dict[str, Any]:
    """Write one file (open, not yet fsynced, in this thread's ``Unsynced`` batch), hashing its bytes on the way
    out; its manifest entry."""
    hasher = CHECKSUMS[CHECKSUM]()
    size = Unsynced.current().write(path, data.pieces() if isinstance(data, TensorFile) else [data], hasher)
    return {CHECKSUM: hasher.hexdigest(), "size": size}


def _write_all(folder: Path, files: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    _verified.clear()  # what a resume kept and did not load is not needed once training saves again
    entries = {}
    for name, data in encode(files).items():
        entries[name] = _write(folder / name, data)
        if killpoints.ACTIVE:
            killpoints.reached("checkpoint.file")
    return entries


def write_files(folder: Path, files: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Encode and write ``files`` into ``folder``, durably; their manifest entries (one process's share of a
    checkpoint that several write)."""
    with Unsynced() as out:
        entries = _write_all(folder, files)
        out.sync()
    return entries


def _write_manifest(tmp: Path, entries: dict[str, dict[str, Any]], meta: Mapping[str, Any] | None) -> None:
    manifest = {"format": FORMAT, "writer": "cadence", "files": entries, **(meta or {})}
    _write(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    if killpoints.ACTIVE:
        killpoints.reached("checkpoint.manifest")


def _publish(tmp: Path, folder: Path) -> Path:
    """Rename the complete, fsynced ``tmp`` (files and names) to ``folder`` and make the rename durable."""
    if killpoints.ACTIVE:
        killpoints.reached("checkpoint.fsync")
    old = None
    if folder.exists():  # saving the same step again: the old copy stays whole until the new one is in place
        old = folder.parent / f"{TMP_PREFIX}old-{folder.name}-{os.getpid()}"
        os.replace(folder, old)
    os.replace(tmp, folder)
    if killpoints.ACTIVE:
        killpoints.reached("checkpoint.rename")
    fsync_dir(folder.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def commit(tmp: Path, folder: Path, entries: dict[str, dict[str, Any]], meta: Mapping[str, Any] | None) -> Path:
    """Write the manifest into ``tmp`` (whose other files are already durable), then rename ``tmp`` to
    ``folder`` and fsync the parent."""
    with Unsynced() as out:
        _write_manifest(tmp, entries, meta)
        out.sync(tmp)
    return _publish(tmp, folder)


def entries_on_disk(folder: Path) -> dict[str, dict[str, Any]]:
    """Manifest entries of the files already in ``folder`` (written by several processes)."""
    out = {}
    for path in sorted(folder.iterdir()):
        hasher = CHECKSUMS[CHECKSUM]()
        with open(path, "rb", buffering=0) as f:
            size = _hash_stream(f, hasher)
        out[path.name] = {CHECKSUM: hasher.hexdigest(), "size": size}
    return out


def temp_folder(folder: Path, shared: bool = False) -> Path:
    """The hidden folder a checkpoint is written into; ``shared`` (several processes) has no pid in its name."""
    return folder.parent / f"{TMP_PREFIX}{folder.name}" if shared else \
        folder.parent / f"{TMP_PREFIX}{folder.name}-{os.getpid()}"


def write_checkpoint(folder: str | Path, files: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``files`` (name -> tensors or JSON-able) as the checkpoint ``folder``, atomically: all files and
    the manifest first, then one fsync pass over them, then the rename."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder(folder)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        with Unsynced() as out:
            entries = _write_all(tmp, files)
            _write_manifest(tmp, entries, meta)
            out.sync(tmp)
        return _publish(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------ reading
# The files the last ``verify`` read, by absolute path: (identity of the file then, tensors or JSON bytes).
_verified: dict[str, tuple[tuple[int, ...], Any]] = {}


def _identity(stat: os.stat_result) -> tuple[int, ...]:
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def _hash_stream(f: Any, hasher: Any, keep: bool = False) -> Any:
    """Hash the rest of ``f``; its bytes if ``keep``, else its size (read through one small buffer)."""
    if keep:
        data = f.read()
        hasher.update(data)
        return data
    buffer = memoryview(bytearray(2**20))
    size = 0
    while got := f.readinto(buffer):
        hasher.update(buffer[:got])
        size += got
    return size


def _check_file(folder: Path, name: str, entry: Mapping[str, Any], keep: bool) -> Any:
    """Read ``folder/name`` once, checking its size and checksum; what it holds (tensors or JSON bytes) when
    ``keep``, else None. Raises ``CheckpointError``; a malformed ``entry`` raises KeyError or TypeError."""
    algorithm = next(a for a in (*CHECKSUMS, None) if a is None or a in entry)
    if algorithm is None:
        raise KeyError(f"{name} has no checksum")
    expected, size = entry[algorithm], entry["size"]
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{folder}: {name} is missing")
    hasher, content = CHECKSUMS[algorithm](), None
    with open(path, "rb", buffering=0) as f:
        stat = os.fstat(f.fileno())
        if stat.st_size == size:
            if keep and name.endswith(".safetensors"):
                try:
                    content = read_tensor_file(f, size, hasher)
                except NotParsed:  # read_tensors refuses it later, unless the safetensors library takes it
                    f.seek(0)
                    hasher = CHECKSUMS[algorithm]()
            if content is None:
                content = _hash_stream(f, hasher, keep=keep and not name.endswith(".safetensors"))
    if stat.st_size != size or hasher.hexdigest() != expected:
        raise CheckpointError(f"{folder}: {name} does not match its checksum (corrupt or changed)")
    return (_identity(stat), content) if keep and not isinstance(content, int) else None


def _read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / MANIFEST).read_bytes())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {MANIFEST}; the save did not finish") from None
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{folder}: {MANIFEST} is unreadable ({err})") from None
    if not isinstance(files, dict):
        raise CheckpointError(f"{folder}: {MANIFEST} has the wrong shape (files is {type(files).__name__})")
    return manifest


def verify(folder: str | Path, keep: bool = True) -> dict[str, Any]:
    """The manifest of ``folder`` after checking every file's size and checksum; raises ``CheckpointError``.

    With ``keep`` (a process alone will load it) the files read are kept for the loads that follow (a checkpoint
    written by one process, up to ``KEEP_BYTES``): what is loaded is exactly what was checked, read once. Ranks
    read only their own files (or, at another world size, their slices), so they keep none."""
    folder = Path(folder)
    _verified.clear()
    manifest = _read_manifest(folder)
    budget = KEEP_BYTES if keep and manifest.get("world_size", 1) == 1 else 0
    kept = {}
    try:
        for name, entry in manifest["files"].items():
            keep = isinstance(entry.get("size"), int) and entry["size"] <= budget
            checked = _check_file(folder, name, entry, keep)
            if checked is not None:
                kept[os.path.abspath(folder / name)] = checked
                budget -= entry["size"]
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{folder}: {MANIFEST} has the wrong shape ({type(err).__name__}: {err})") from None
    _verified.update(kept)
    return manifest


class _NoHash:
    def update(self, data: Any) -> None:
        pass


def _kept(path: Path, pop: bool) -> Any:
    """What ``verify`` read of ``path``, if the file is still the one it read."""
    key = os.path.abspath(path)
    found = _verified.pop(key, None) if pop else _verified.get(key)
    if found is None:
        return None
    try:
        return found[1] if _identity(os.stat(path)) == found[0] else None
    except OSError:
        return None


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, refusing anything else (a pickle renamed, a truncated file)."""
    path = Path(path)
    kept = _kept(path, pop=True)
    if isinstance(kept, dict):
        return kept
    try:
        with open(path, "rb", buffering=0) as f:
            try:
                return read_tensor_file(f, os.fstat(f.fileno()).st_size, _NoHash())
            except NotParsed:  # a file the fast reader does not take: the library decides
                f.seek(0)
                data = f.read()
        return load_safetensors(data)
    except Exception as err:  # safetensors raises its own error type for a bad header
        raise CheckpointError(f"{path}: not a valid safetensors file ({err})") from None


def read_json(path: str | Path) -> Any:
    path = Path(path)
    kept = _kept(path, pop=False)
    try:
        return json.loads(kept if isinstance(kept, bytes) else path.read_bytes())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable JSON ({err})") from None
