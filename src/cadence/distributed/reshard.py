"""A checkpoint's weights and optimizer state read at another layout, slice by slice.

A checkpoint holds each tensor whole (``model.safetensors``, ``optimizer.safetensors``: a single process or DDP)
or in pieces along one dimension, one file per rank (FSDP: ``model-rankNNNNN.safetensors``, laid out in
``model-shards.json``, and ``optimizer-rankNNNNN.safetensors``, whose tensors are split like their parameters).
:class:`Saved` reads any range of rows of a tensor from the pieces that hold it, and only those bytes (plain reads
at the offsets of the safetensors header: :class:`~cadence.checkpoint.tensorfile.Rows`), so an FSDP rank at another
world size reads its own slice of each tensor and never the whole model; a single process or DDP reads whole
tensors, joined from the shards.

FSDP2 splits a tensor of ``n`` rows among ``W`` ranks as ``torch.chunk`` does: rank ``r`` holds rows
``[min(r * c, n), min((r + 1) * c, n))`` with ``c = ceil(n / W)`` (:func:`rows_of`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.format import CheckpointError, read_json
from ..checkpoint.tensorfile import NotParsed, Rows
from ..errors import ConfigError

SHARDS = "model-shards.json"  # a sharded checkpoint's layout: which tensors are split, along which dim, how big


def rank_files(folder: Path, stem: str, suffix: str = "safetensors") -> list[Path]:
    """The per-rank files ``stem-rankNNNNN.suffix`` of a sharded checkpoint, in rank order."""
    world = read_json(folder / SHARDS)["world_size"]
    return [folder / f"{stem}-rank{r:05d}.{suffix}" for r in range(world)]


def saved_world_size(folder: Path) -> int | None:
    """The number of ranks whose shards the checkpoint holds; None for whole tensors (or no layout recorded)."""
    return int(read_json(folder / SHARDS)["world_size"]) if (folder / SHARDS).is_file() else None


class Saved:
    """The tensors of ``stem.safetensors`` (whole) or of ``stem-rankNNNNN.safetensors`` (pieces), read by rows.

    ``split(name, shape)`` says along which dim the pieces of a tensor are split (None: each file holds it whole);
    it is asked only for a sharded checkpoint.
    """

    def __init__(self, folder: Path, stem: str, split: Callable[[str, list[int]], int | None]) -> None:
        whole = folder / f"{stem}.safetensors"
        if whole.is_file():
            paths = [whole]
        elif (folder / SHARDS).is_file():
            paths = rank_files(folder, stem)
        else:
            raise ConfigError(f"resume={str(folder)!r}: this sharded checkpoint has no {SHARDS} (cadence 0.x wrote "
                              "none), so its shards cannot be put together at another layout; resume it with its "
                              "own strategy and number of processes.")
        self.folder = folder
        try:
            self.files = [Rows(p) for p in paths]
        except NotParsed as err:
            raise CheckpointError(f"{folder}: {err}") from None
        self._split = split
        self.sharded = not whole.is_file()

    def keys(self) -> list[str]:
        return self.files[0].keys()

    def _dim(self, name: str) -> int | None:
        return self._split(name, self.files[0].shape(name)) if self.sharded else None

    def shape(self, name: str) -> list[int]:
        """The whole tensor's shape."""
        shape = self.files[0].shape(name)
        dim = self._dim(name)
        if dim is not None:
            shape[dim] = sum(f.shape(name)[dim] for f in self.files)
        return shape

    def whole(self, name: str) -> torch.Tensor:
        dim = self._dim(name)
        if dim is None:
            return self.files[0].rows(name)
        return torch.cat([f.rows(name) for f in self.files], dim)

    def rows(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """``whole(name).narrow(dim, start, stop - start)``, reading only the pieces (and bytes) that hold it."""
        saved_dim = self._dim(name)
        if dim != 0 or saved_dim not in (None, 0):  # FSDP2 splits dim 0: anything else is read whole, then cut
            return self.whole(name).narrow(dim, start, stop - start).clone()
        if saved_dim is None:
            return self.files[0].rows(name, start, stop)
        if stop <= start:  # FSDP2 leaves the last ranks of a short tensor no rows
            return self.files[0].rows(name, 0, 0)
        pieces, offset = [], 0
        for f in self.files:
            n = f.shape(name)[0]
            a, z = max(start, offset), min(stop, offset + n)
            if z > a:
                pieces.append(f.rows(name, a - offset, z - offset))
            offset += n
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def rows_of(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of an ``n``-row tensor that FSDP2 gives ``rank`` of ``world_size``."""
    chunk = -(-n // world_size)
    return min(rank * chunk, n), min((rank + 1) * chunk, n)


def shard_of(saved: Saved, name: str, target: Any, world_size: int, rank: int) -> torch.Tensor:
    """This rank's piece of the saved tensor ``name`` for the live tensor ``target`` (an FSDP2 DTensor, or a plain
    tensor that every rank holds whole)."""
    dim = next((p.dim for p in getattr(target, "placements", ()) if p.is_shard()), None)
    if list(saved.shape(name)) != list(target.shape):
        raise ConfigError(f"resume={str(saved.folder)!r}: {name} is saved with shape {saved.shape(name)}, but this "
                          f"run's is {list(target.shape)}; resume with the same model.")
    if dim is None:
        return saved.whole(name)
    start, stop = rows_of(target.shape[dim], world_size, rank)
    local = target.to_local()
    if local.shape[dim] != stop - start:
        raise ConfigError(f"resume={str(saved.folder)!r}: this rank holds {local.shape[dim]} rows of {name}, not the "
                          f"{stop - start} FSDP2's even split gives; resume at the checkpoint's number of processes.")
    return saved.rows(name, dim, start, stop)


def model_split(folder: Path) -> Callable[[str, list[int]], int | None]:
    """Along which dim a sharded checkpoint split each of the model's tensors (``model-shards.json``)."""
    sharded = read_json(folder / SHARDS)["sharded"] if (folder / SHARDS).is_file() else {}
    return lambda name, shape: sharded[name]["dim"] if name in sharded else None


def optimizer_split(name: str, shape: list[int]) -> int | None:
    """FSDP2 lays out a parameter's optimizer state like the parameter: split along dim 0, but the scalar step."""
    return 0 if len(shape) >= 1 and not name.endswith(".step") else None


def optimizer_json(folder: Path) -> Any:
    """The optimizer's groups and plain values: the same on every rank, so rank 0's of a sharded checkpoint."""
    whole = folder / "optimizer.json"
    return read_json(whole if whole.is_file() else rank_files(folder, "optimizer", "json")[0])


def optimizer_tensors(folder: Path, params: Iterable[torch.Tensor], world_size: int,
                      rank: int) -> dict[str, torch.Tensor]:
    """The optimizer state's tensors (``state.<param>.<key>``) as this rank holds them: for a parameter sharded
    here, its rows; else whole."""
    saved = Saved(folder, "optimizer", optimizer_split)
    params = list(params)
    out = {}
    for name in saved.keys():
        index = int(name.split(".", 2)[1])
        p = params[index] if index < len(params) else None
        if p is not None and list(saved.shape(name)) == list(p.shape) and len(p.shape) >= 1:
            out[name] = shard_of(saved, name, p, world_size, rank)
        else:
            out[name] = saved.whole(name)
    return out
