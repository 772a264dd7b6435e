"""Random draws inside the data pipeline as part of the data order contract.

A map-style dataset that augments in ``__getitem__`` (a random crop, a random sequence shift) draws from
``random``, ``numpy`` and torch's CPU generator. Left alone, what it draws depends on everything drawn before:
the worker that loads the item, how many items that worker loaded since it started, and, after a resume, how
far the run got. cadence fixes it instead:

- **per item** (``item_seeding=True``, the default): item ``i`` of epoch ``e`` draws what the three generators
  give right after ``seed_generators(item_seed(seed, e, i))``, so an item's draws depend on nothing else: the
  same with 0 or N workers, at any world size, and after any resume. In the main process (``num_workers=0``)
  the generators are put back after the micro-batch's items, so the model's own draws (dropout) go on from
  where they were;
- **per micro-batch, in worker processes**: before the ``collate_fn`` runs in a worker (and, with
  ``item_seeding=False``, before the items are read) the worker's generators are seeded with
  ``batch_seed(seed, e, m)``, ``m`` the micro-batch's number in this rank's epoch, so a resumed run's
  workers draw what the uninterrupted run's did.

Seeding is lazy, because seeding three generators costs more than reading a small item: each process seeds,
before every item, only the generators it has seen the dataset draw from. The others are watched: a mark of
each (its position, its first four words, its cached normals: a few bytes read from memory, see ``_Numpy``) is
read before and after each micro-batch, and when one moved, the generator is put back, seeded from then on,
and the micro-batch is read again. The draws are therefore those of seeding all three: an item only reads
generators that were seeded for it. A dataset that never draws pays a few microseconds per micro-batch. A
draw the mark misses would have to take exactly a multiple of 624 words and leave the first four as they were
after the refill (a chance of 2**-128).

``seed`` is the run's seed (for the ``k``-th of several training sources, ``seed + 1_000_003 * k``, as for
its order). The mixing is 64-bit (``_mix``); numpy's legacy generator takes the 32-bit fold
``(s ^ (s >> 32)) & 0xFFFFFFFF`` of it.
"""

from __future__ import annotations

import ctypes
import random
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

_MASK = 2**64 - 1


def _mix(*words: int) -> int:
    """A 64-bit seed from small integers (a splitmix64 finaliser over a multiply-add of the words)."""
    x = 0
    for w in words:
        x = (x * 0x9E3779B97F4A7C15 + (w & _MASK) + 0x632BE59BD9B4E019) & _MASK
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & _MASK
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & _MASK
        x ^= x >> 31
    return x


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of item ``index``'s draws in ``epoch``: ``_mix(seed, epoch, index)``."""
    return _mix(seed, epoch, index)


def item_seeds(seed: int, epoch: int, indices: Sequence[int]) -> list[int]:
    """``item_seed(seed, epoch, i)`` for every ``i`` of ``indices``, in one vectorised pass: ``_mix``'s last
    round in numpy's ``uint64`` arithmetic, which wraps modulo ``2**64`` as ``_mix``'s masks do."""
    u = np.uint64
    x = np.asarray(indices, dtype=np.uint64) + u((_mix(seed, epoch) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK)
    x ^= x >> u(30)
    x *= u(0xBF58476D1CE4E5B9)
    x ^= x >> u(27)
    x *= u(0x94D049BB133111EB)
    x ^= x >> u(31)
    return x.tolist()


def batch_seed(seed: int, epoch: int, micro_batch: int) -> int:
    """The seed of a worker's draws for micro-batch ``micro_batch`` of ``epoch`` (its ``collate_fn``)."""
    return _mix(seed, epoch, micro_batch, 0x636F6C6C)  # the last word keeps it apart from item seeds


def seed_generators(value: int) -> None:
    """Seed ``random``, numpy's global generator (with the value's 32-bit fold) and torch's CPU generator."""
    random.seed(value)
    np.random.seed((value ^ (value >> 32)) & 0xFFFFFFFF)  # a 32-bit seed: 6x cheaper than a seed array
    torch.default_generator.manual_seed(value)


def _view(address: int, size: int) -> memoryview:
    """The ``size`` bytes at ``address``, live: ``bytes()`` of it reads them (10x cheaper than ``string_at``)."""
    return memoryview((ctypes.c_char * size).from_address(address)).cast("B")


class _Python:
    """``random``'s global generator. ``random.getstate()`` builds a tuple of 625 ints (about 6 us, and as
    much to compare two), so its state is read from memory instead: the C object's ``int index; uint32_t
    state[624]``, found where the words ``getstate()`` gives appear in it, and the ``gauss_next`` cache of
    ``random.Random``. If they are not found (another Python), ``getstate()`` is used."""

    def __init__(self) -> None:
        self.words = _python_words(random._inst)
        if self.words is not None:
            self.marked = _view(self.words.ctypes.data, 20)  # the index and the first 4 words

    def state(self) -> Any:
        if self.words is None:
            return random.getstate()
        return self.words.tobytes(), random._inst.gauss_next

    def mark(self) -> Any:
        if self.words is None:
            return random.getstate()
        return bytes(self.marked), random._inst.gauss_next

    def put_back(self, state: Any) -> None:
        if self.words is None:
            random.setstate(state)
            return
        words, gauss_next = state
        index, *key = np.frombuffer(words, dtype=np.uint32).tolist()
        random.setstate((3, (*key, index), gauss_next))

    seed = staticmethod(random.seed)


def _python_words(rng: random.Random) -> np.ndarray | None:
    """A view of ``rng``'s index and 624 state words, or ``None`` if its memory is not laid out that way."""
    saved = rng.getstate()
    version, words, _ = saved
    at = ctypes.string_at(id(rng), type(rng).__basicsize__).find(struct.pack("624I", *words[:624]))
    if version != 3 or at < 4:
        return None
    view = np.ctypeslib.as_array((ctypes.c_uint32 * 625).from_address(id(rng) + at - 4))
    try:
        rng.random()  # the view must follow the generator
        now = rng.getstate()[1]
        return view if view[1:].tolist() == list(now[:624]) and view[0] == now[624] else None
    finally:
        rng.setstate(saved)


class _Torch:
    """torch's CPU generator. ``get_state()`` allocates a 5 KB tensor, which costs 5-15 us between the steps
    of a small model, so its state is read from memory instead: the Mersenne Twister's words, position and
    seed and the cached normal samples (plain data in the generator's C++ object), found where the words
    ``get_state()`` gives appear and checked by drawing. If they are not found (another torch),
    ``get_state()`` is used."""

    def __init__(self) -> None:
        self.region = _torch_region()
        if self.region is not None:  # the seed, the position and the first 4 words; the normal caches
            at = self.region[0]
            self.marked = _view(at, _MT_HEAD + 16), _view(at + _MT_REGION - 24, 24)

    def state(self) -> Any:
        if self.region is None:
            return torch.default_generator.get_state().numpy().tobytes()
        return ctypes.string_at(*self.region)

    def mark(self) -> Any:
        if self.region is None:
            return self.state()
        head, caches = self.marked
        return bytes(head), bytes(caches)

    def put_back(self, state: Any) -> None:
        if self.region is None:
            torch.default_generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
        else:
            ctypes.memmove(self.region[0], state, self.region[1])

    seed = staticmethod(torch.default_generator.manual_seed)


# torch's CPUGeneratorImpl holds an ``at::mt19937`` (``uint64 seed_; int left_; bool seeded_; uint32 next_;
# uint32 state_[624]``, 2516 bytes, padded to 2520) then ``optional<float>`` and ``optional<double>`` caches.
_MT_HEAD, _MT_REGION = 20, 2520 + 8 + 16


def _torch_region() -> tuple[int, int] | None:
    """``(address, size)`` of the CPU generator's state in memory, or ``None`` if it is not laid out as above."""
    g = torch.default_generator
    saved = g.get_state()
    try:
        # get_state(): uint64 seed, int left, int seeded, uint64 next, then the 624 words as uint64
        words = saved.numpy()[24:24 + 624 * 8].view(np.uint64).astype(np.uint32).tobytes()
        impl = ctypes.c_void_p.from_address(id(g) + object.__basicsize__).value  # THPGenerator: the impl pointer
        at = ctypes.string_at(impl, 512 + 16).find(words[:16])
        if at < _MT_HEAD:
            return None
        region = (impl + at - _MT_HEAD, _MT_REGION)
        before = ctypes.string_at(*region)
        if before[_MT_HEAD:_MT_HEAD + len(words)] != words or ctypes.string_at(*region) != before:
            return None
        seen = [before]
        for draw in (torch.rand, torch.randn, torch.randn):  # the second normal comes from the cache
            draw(1)
            seen.append(ctypes.string_at(*region))
        ctypes.memmove(region[0], before, region[1])
        if len(set(seen)) != len(seen) or not torch.equal(g.get_state(), saved):
            return None
        return region
    finally:
        g.set_state(saved)


class _Numpy:
    """numpy's legacy global generator. ``np.random.get_state()`` costs about 45 us, too much to call per
    micro-batch, so its state is read from memory instead: the Mersenne Twister's 624 words and position
    through numpy's ``ctypes`` interface, and the cached normal (a flag and a double inside the ``RandomState``
    object) at the place where setting a marker value through ``set_state`` makes it appear. If that place is
    not found (another numpy), ``get_state()`` is used."""

    def __init__(self) -> None:
        rs = np.random.mtrand._rand
        words = (ctypes.c_uint32 * 625).from_address(rs._bit_generator.ctypes.state_address)
        self.words = np.ctypeslib.as_array(words)  # a view: key[624] then pos
        self.cache = _gauss_cache(rs)
        if self.cache is not None:  # the first 4 words, the position; the cached normal's flag and value
            at = ctypes.addressof(words)
            self.marked = _view(at, 16), _view(at + 2496, 4), _view(ctypes.addressof(self.cache[0]), 16)

    def state(self) -> tuple[bytes, int, float]:
        if self.cache is None:
            _, key, pos, flag, value = np.random.get_state()
            return key.tobytes() + struct.pack("i", pos), flag, value
        flag, value = self.cache
        return self.words.tobytes(), flag.value, value.value

    def mark(self) -> Any:
        if self.cache is None:
            return self.state()
        words, pos, cache = self.marked
        return bytes(words), bytes(pos), bytes(cache)

    def put_back(self, state: tuple[bytes, int, float]) -> None:
        words, flag, value = state
        key = np.frombuffer(words, dtype=np.uint32)
        np.random.set_state(("MT19937", key[:624], int(key[624:].view(np.int32)[0]), flag, value))

    @staticmethod
    def seed(value: int) -> None:
        np.random.seed((value ^ (value >> 32)) & 0xFFFFFFFF)


def _gauss_cache(rs: np.random.RandomState) -> tuple[ctypes.c_int, ctypes.c_double] | None:
    """Views of ``rs``'s cached-normal flag and value (``int has_gauss; double gauss;`` after a pointer, in its
    ``aug_bitgen_t``), found by setting a marker through ``set_state``; ``None`` if the layout is not that."""
    saved = rs.get_state()
    base, size = id(rs), type(rs).__basicsize__
    try:
        marker = -1.2345678901234567e-123
        rs.set_state((*saved[:3], 1, marker))
        at = ctypes.string_at(base, size).find(struct.pack("d", marker))
        if at < 8 or at % 8:
            return None
        flag, value = ctypes.c_int.from_address(base + at - 8), ctypes.c_double.from_address(base + at)
        for has, cached in ((0, 0.0), (1, 0.5), (1, marker)):
            rs.set_state((*saved[:3], has, cached))
            if (flag.value, value.value) != (has, cached):
                return None
        return flag, value
    finally:
        rs.set_state(saved)


_GENERATORS: tuple[Any, ...] | None = None


def _generators() -> tuple[Any, ...]:
    """The three global generators, in the order they are seeded (made once per process, on first use)."""
    global _GENERATORS
    if _GENERATORS is None:
        _GENERATORS = (_Python(), _Numpy(), _Torch())
    return _GENERATORS


class SeededItems(Dataset):
    """``data`` read micro-batch by micro-batch with the draws seeded as the module docstring says.

    The sampler gives it keys ``(epoch, micro_batch, indices)``; ``__getitems__`` returns the items, which the
    DataLoader then collates. ``drawn`` holds the generators (their places in ``_generators()``) this process
    has seen the dataset draw from; the others are watched.
    """

    def __init__(self, data: Any, seed: int, per_item: bool) -> None:
        self.data, self.seed, self.per_item = data, seed, per_item
        self.drawn: tuple[int, ...] = ()
        self._marked: tuple[Any, ...] = (None, None, None)  # the generators' marks when _states was copied
        self._states: list[Any] = [None, None, None]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        return self.data[index]

    def __getitems__(self, key: tuple[int, int, Sequence[int]]) -> list[Any]:
        epoch, micro_batch, indices = key
        in_worker = get_worker_info() is not None
        if not self.per_item:
            if in_worker:
                seed_generators(batch_seed(self.seed, epoch, micro_batch))
            return [self.data[i] for i in indices]
        items = self._read(epoch, indices, put_back=not in_worker)
        if in_worker:
            seed_generators(batch_seed(self.seed, epoch, micro_batch))
        return items

    def _read(self, epoch: int, indices: Sequence[int], put_back: bool) -> list[Any]:
        """The items, each read right after seeding the generators in ``drawn``. A watched generator whose mark
        changed is put back (in the main process) and joins ``drawn``, and the micro-batch is read again."""
        if not self.drawn:  # the usual case, kept to a few calls: a dataset not seen drawing
            items = self._read_watching_all(indices, put_back)
            if items is not None:
                return items
        generators = _generators()
        while True:
            drawn = [generators[k] for k in self.drawn]
            watched = [k for k in range(len(generators)) if k not in self.drawn]
            marks = [generators[k].mark() for k in watched]
            if put_back:  # the states to put back: the drawn generators', and the watched ones' before the read
                saved = [g.state() for g in drawn]
                kept = [generators[k].state() for k in watched]
            items = []
            for s, i in zip(item_seeds(self.seed, epoch, indices), indices):
                for g in drawn:
                    g.seed(s)
                items.append(self.data[i])
            if put_back:
                for g, state in zip(drawn, saved):
                    g.put_back(state)
            moved = [n for n, (k, m) in enumerate(zip(watched, marks)) if generators[k].mark() != m]
            if not moved:
                return items
            if put_back:
                for n in moved:
                    generators[watched[n]].put_back(kept[n])
            self.drawn = tuple(sorted(self.drawn + tuple(watched[n] for n in moved)))

    def _read_watching_all(self, indices: Sequence[int], put_back: bool) -> list[Any] | None:
        """The items read with no generator seeded, or ``None`` if one moved (then put back, and in ``drawn``).

        In the main process a generator is put back from a copy of its state, taken again only when its mark
        moved since the last copy (the model's draws move torch's at every step with dropout)."""
        generators = _generators()
        before = tuple(g.mark() for g in generators)
        if put_back and before != self._marked:
            self._states = [state if mark == last else g.state()
                            for g, mark, last, state in zip(generators, before, self._marked, self._states)]
            self._marked = before
        items = [self.data[i] for i in indices]
        after = tuple(g.mark() for g in generators)
        if after == before:
            return items
        moved = tuple(k for k in range(len(generators)) if after[k] != before[k])
        if put_back:
            for k in moved:
                generators[k].put_back(self._states[k])
        self.drawn = moved
        return None
