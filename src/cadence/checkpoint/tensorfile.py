"""safetensors files written from the tensors' own memory and read straight into new tensors.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` padded with spaces to a multiple of 8, then the
tensors' bytes back to back. ``safetensors.torch.save`` builds the whole file as one ``bytes`` object (two
copies of every tensor) and ``load`` copies each tensor out of the file's bytes again; for a checkpoint those
copies cost as much as the write itself. Here the header is built by hand, each tensor's memory goes to the
file as it is, and a read allocates each tensor once and reads its bytes into it. Files the fast path does not
handle (a dtype it does not know, a big-endian machine) go through the safetensors library instead, so every
file written or read is one the library writes and reads.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch
from safetensors.torch import save as save_safetensors

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        DTYPES[getattr(torch, _name)] = _code
CODES = {code: dtype for dtype, code in DTYPES.items()}
MAX_HEADER = 100 * 2**20  # as the safetensors library: a larger header is a damaged or hostile file
CHUNK = 8 * 2**20  # big tensors are read and written in pieces, so hashing and the disk overlap
SMALL = 64 * 2**10  # tensors smaller than this are copied into one buffer and written together


class NotParsed(ValueError):
    """The fast reader cannot take this file (damaged, or a dtype it does not know): use the library."""


@dataclass
class TensorFile:
    """An encoded safetensors file: its header, then the byte views of its tensors, in file order."""

    header: bytes
    parts: list[memoryview]

    def pieces(self) -> Iterator[memoryview | bytearray]:
        """The file's bytes: small tensors gathered into one buffer (one write, not one each), large ones as
        views of their own memory, in pieces of ``CHUNK``."""
        batch = bytearray(self.header)
        for part in self.parts:
            if len(part) < SMALL:
                batch += part
                if len(batch) >= CHUNK:
                    yield batch
                    batch = bytearray()
                continue
            if batch:
                yield batch
                batch = bytearray()
            for start in range(0, len(part), CHUNK):
                yield part[start:start + CHUNK]
        if batch:
            yield batch


def raw(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _host(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t if t.is_contiguous() else t.contiguous()


def encode_tensors(tensors: Mapping[str, torch.Tensor]) -> TensorFile | bytes:
    """``tensors`` as a safetensors file; ``bytes`` (from the library) where the fast path does not apply."""
    tensors = {k: _host(v) for k, v in tensors.items()}
    if sys.byteorder != "little" or any(v.dtype not in DTYPES for v in tensors.values()):
        return save_safetensors(tensors)
    # the widest dtypes first, each group by name: every tensor starts aligned to its own element size
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return TensorFile(struct.pack("<Q", len(text)) + text, [raw(tensors[k]) for k in order if tensors[k].numel()])


def _layout(header: Any, data_size: int) -> list[tuple[str, torch.dtype, list[int], int]]:
    """Check a parsed header against the file; (name, dtype, shape, size) in file order."""
    if not isinstance(header, dict):
        raise NotParsed("the header is not a JSON object")
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = CODES[info["dtype"]], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise NotParsed(f"entry {name!r} is malformed or has an unknown dtype") from None
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
                and type(begin) is int and type(end) is int):
            raise NotParsed(f"entry {name!r} has a bad shape or offsets")
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize:
            raise NotParsed(f"entry {name!r}: its offsets do not match its shape")
        entries.append((begin, end, name, dtype, shape))
    entries.sort()
    position = 0
    for begin, end, name, _, _ in entries:
        if begin != position:
            raise NotParsed(f"entry {name!r} does not follow the previous one")
        position = end
    if position != data_size:
        raise NotParsed("the tensors do not fill the file")
    return [(name, dtype, shape, end - begin) for begin, end, name, dtype, shape in entries]


def _read_into(f: BinaryIO, view: memoryview, hasher: Any) -> None:
    """Fill ``view`` from ``f``, feeding each piece to ``hasher`` while it is still in the cache."""
    done = 0
    while done < len(view):
        got = f.readinto(view[done:done + CHUNK])
        if not got:
            raise NotParsed("the file ends early")
        hasher.update(view[done:done + got])
        done += got


def read_tensor_file(f: BinaryIO, size: int, hasher: Any) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file open as ``f`` (``size`` bytes), every byte read once and hashed."""
    if sys.byteorder != "little" or size < 8:
        raise NotParsed("not handled here")
    prefix = f.read(8)
    (length,) = struct.unpack("<Q", prefix)
    if length > min(MAX_HEADER, size - 8):
        raise NotParsed("the header length is larger than the file")
    text = f.read(length)
    hasher.update(prefix)
    hasher.update(text)
    try:
        header = json.loads(text)
    except ValueError as err:
        raise NotParsed(f"the header is not JSON ({err})") from None
    tensors = {}
    for name, dtype, shape, nbytes in _layout(header, size - 8 - length):
        try:
            t = torch.empty(shape, dtype=dtype)
        except (RuntimeError, OverflowError, TypeError, ValueError) as err:  # an empty shape, an absurd dimension
            raise NotParsed(f"entry {name!r}: {err}") from None
        if nbytes:
            _read_into(f, raw(t), hasher)
        tensors[name] = t
    return tensors


class _Unhashed:
    def update(self, data: Any) -> None:
        pass


class Rows:
    """A safetensors file read by rows (a range of the first dimension of a tensor): plain reads of only those bytes
    into memory of their own. (safetensors' ``safe_open`` gives views of the file mapped, read lazily and counted
    in the process's memory for as long as the mapping lives.)"""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = path
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            (length,) = struct.unpack("<Q", f.read(8)) if size >= 8 else (size,)
            if sys.byteorder != "little" or length > min(MAX_HEADER, size - 8):
                raise NotParsed(f"{path}: not a safetensors file this reader takes")
            try:
                header = json.loads(f.read(length))
            except ValueError as err:
                raise NotParsed(f"{path}: the header is not JSON ({err})") from None
        self._entries: dict[str, tuple[torch.dtype, list[int], int]] = {}
        begin = 8 + length
        for name, dtype, shape, nbytes in _layout(header, size - 8 - length):
            self._entries[name] = (dtype, shape, begin)
            begin += nbytes

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> list[int]:
        return list(self._entries[name][1])

    def rows(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of tensor ``name`` (all of it by default; a scalar is read whole)."""
        dtype, shape, begin = self._entries[name]
        if not shape:
            out, offset = torch.empty((), dtype=dtype), begin
        else:
            start, stop = start or 0, shape[0] if stop is None else stop
            row = dtype.itemsize
            for d in shape[1:]:
                row *= d
            out, offset = torch.empty([max(stop - start, 0), *shape[1:]], dtype=dtype), begin + start * row
        if out.numel():
            with open(self.path, "rb", buffering=0) as f:
                f.seek(offset)
                _read_into(f, raw(out), _Unhashed())
        return out
