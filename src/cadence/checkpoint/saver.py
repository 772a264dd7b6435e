"""Writes checkpoints: in the calling thread, in one background thread, or from several processes."""

from __future__ import annotations

import shutil
import threading
from typing import TYPE_CHECKING, Any

from .. import killpoints
from .format import commit, entries_on_disk, temp_folder, write_checkpoint, write_files
from .staging import Staging
from .store import Checkpoints

if TYPE_CHECKING:
    from ..distributed import Strategy


class Saver:
    """Writes checkpoints: in the calling thread, in one background thread (``background=True``, a single
    process), or with several processes (each writes its files into one shared temporary folder, rank 0
    writes the manifest and commits)."""

    def __init__(self, store: Checkpoints, strategy: Strategy, background: bool = False) -> None:
        self.store, self.strategy = store, strategy
        self.background = background and not strategy.writes_together
        # the background writer's copies of the state; refilled only once the write that reads them is done
        self.staging = Staging() if self.background else None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, step: int, files: dict[str, Any], kept_for: str | None = None) -> None:
        """Write the checkpoint of ``step``; ``kept_for="best"`` marks one saved only for ``keep_best``."""
        self.wait()
        meta = {"step": step, **({"kept_for": kept_for} if kept_for else {})}
        if self.strategy.writes_together:
            self._write_together(step, files, meta)
        elif not self.background:
            self._write(step, files, meta)
        else:
            self._thread = threading.Thread(target=self._write_catching, args=(step, files, meta), daemon=True,
                                            name="cadence-checkpoint")
            self._thread.start()

    def _write(self, step: int, files: dict[str, Any], meta: dict[str, Any]) -> None:
        with killpoints.saving(step):
            write_checkpoint(self.store.path(step), files, meta)
            if killpoints.ACTIVE:
                killpoints.reached("checkpoint.committed")
            self.store.prune()

    def _write_together(self, step: int, files: dict[str, Any], meta: dict[str, Any]) -> None:
        with killpoints.saving(step):
            self._write_shares(step, files, meta)

    def _write_shares(self, step: int, files: dict[str, Any], meta: dict[str, Any]) -> None:
        folder = self.store.path(step)
        tmp = temp_folder(folder, shared=True)
        if self.strategy.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.strategy.barrier()
        write_files(tmp, files)
        self.strategy.barrier()
        if self.strategy.is_main:
            commit(tmp, folder, entries_on_disk(tmp), {**meta, "world_size": self.strategy.world_size})
            if killpoints.ACTIVE:
                killpoints.reached("checkpoint.committed")
            self.store.prune()
        self.strategy.barrier()

    def _write_catching(self, step: int, files: dict[str, Any], meta: dict[str, Any]) -> None:
        try:
            self._write(step, files, meta)
        except BaseException as err:  # reported by the next wait() in the training thread
            self._error = err

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
