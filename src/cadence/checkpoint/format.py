"""The on-disk format of one checkpoint folder, and its atomic commit.

A checkpoint is a folder of ``*.safetensors`` and ``*.json`` files plus ``manifest.json``, which lists the
SHA-256 and size of every other file. It is written into a hidden temporary folder beside its final place,
each file is fsynced, the folder is renamed into place and the parent fsynced: a crash at any moment leaves
either the complete checkpoint or no checkpoint (a stray temporary folder, ignored and cleaned up later).
Reading never unpickles anything: tensors come from safetensors, everything else from JSON.
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
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

MANIFEST = "manifest.json"
FORMAT = 1
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that is incomplete, corrupt, or does not fit this run."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> dict[str, Any]:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def encode(files: Mapping[str, Any]) -> dict[str, bytes]:
    """File contents: ``dict[str, Tensor]`` -> safetensors bytes, anything else -> JSON bytes."""
    out = {}
    for name, content in files.items():
        if name.endswith(".safetensors"):
            tensors = {k: v.contiguous() for k, v in content.items()}
            out[name] = save_safetensors(tensors)
        else:
            out[name] = json.dumps(content, indent=1, sort_keys=True).encode()
    return out


def write_files(folder: Path, files: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Encode and write ``files`` into ``folder``, each fsynced; their manifest entries."""
    return {name: _write(folder / name, data) for name, data in encode(files).items()}


def commit(tmp: Path, folder: Path, entries: dict[str, dict[str, Any]], meta: Mapping[str, Any] | None) -> Path:
    """Write the manifest into ``tmp``, then rename ``tmp`` to ``folder`` and fsync the parent."""
    manifest = {"format": FORMAT, "writer": "cadence", "files": entries, **(meta or {})}
    _write(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    _fsync_dir(tmp)
    old = None
    if folder.exists():  # saving the same step again: the old copy stays whole until the new one is in place
        old = folder.parent / f"{TMP_PREFIX}old-{folder.name}-{os.getpid()}"
        os.replace(folder, old)
    os.replace(tmp, folder)
    _fsync_dir(folder.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def entries_on_disk(folder: Path) -> dict[str, dict[str, Any]]:
    """Manifest entries of the files already in ``folder`` (written by several processes)."""
    out = {}
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        out[path.name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    return out


def temp_folder(folder: Path, shared: bool = False) -> Path:
    """The hidden folder a checkpoint is written into; ``shared`` (several processes) has no pid in its name."""
    return folder.parent / f"{TMP_PREFIX}{folder.name}" if shared else \
        folder.parent / f"{TMP_PREFIX}{folder.name}-{os.getpid()}"


def write_checkpoint(folder: str | Path, files: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``files`` (name -> tensors or JSON-able) as the checkpoint ``folder``, atomically."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder(folder)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        return commit(tmp, folder, write_files(tmp, files), meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def verify(folder: str | Path) -> dict[str, Any]:
    """The manifest of ``folder`` after checking every file's size and SHA-256; raises ``CheckpointError``."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {MANIFEST}; the save did not finish") from None
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{folder}: {MANIFEST} is unreadable ({err})") from None
    try:
        for name, entry in files.items():
            path = folder / name
            if not path.is_file():
                raise CheckpointError(f"{folder}: {name} is missing")
            data = path.read_bytes()
            if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise CheckpointError(f"{folder}: {name} does not match its checksum (corrupt or changed)")
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{folder}: {MANIFEST} has the wrong shape ({type(err).__name__}: {err})") from None
    return manifest


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, refusing anything else (a pickle renamed, a truncated file)."""
    try:
        return load_safetensors(Path(path).read_bytes())
    except Exception as err:  # safetensors raises its own error type for a bad header
        raise CheckpointError(f"{path}: not a valid safetensors file ({err})") from None


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable JSON ({err})") from None
