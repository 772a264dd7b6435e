"""The run folder: one owner at a time, claimed only once every check has passed, never clobbered.

- **Checked first, changed last.** :func:`check_run_dir` only reads (is it a file, does it hold a run, can it
  be written); the folder is created, locked, cleared (``overwrite``) and given its ``config.yaml`` only when
  ``fit()`` starts, after the whole config, every ``Trainer`` argument and the resume checkpoint were checked.
- **Locked while training.** ``fit()`` holds ``fcntl.flock`` on ``RUN/.lock`` (which holds its PID): a second
  process training in the same folder fails at once, naming the PID. The kernel drops the lock when the
  process dies, so a SIGKILLed run leaves no stale lock. The lock belongs to the training process alone: a child
  it forks (DataLoader workers, compile workers, a user's ``multiprocessing`` or ``subprocess``) closes its copy
  of the descriptor at once, so a child that outlives a killed run does not keep the folder locked. With several
  processes, rank 0 holds it for all.
- **Overwrite removes only what cadence wrote**: its known files and folders, and ``checkpoints/step-*``
  folders whose manifest says cadence wrote them. A user's file is never removed.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from . import killpoints
from .errors import ConfigError, bad

try:  # POSIX; elsewhere the folder is not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK = ".lock"
# Top-level files a run writes. config.yaml is not among them: cadence fit writes it (with CONFIG_MARK on its
# first line), and a config.yaml without the mark is a user's, never replaced without --overwrite.
FILES = ("metrics.jsonl",)
CONFIG = "config.yaml"
CONFIG_MARK = "# written by cadence fit: the resolved config of this run (cadence fit --config FILE replays it)\n"
FINAL = ("model.safetensors", "ema.safetensors")  # final/ files
TRACKERS = ("tensorboard", "mlflow", "wandb")  # folders the trackers' own libraries fill
EXTRA = ("report.html", "profile/trace.json")  # removed by overwrite, but alone they are no run


def notice(text: str) -> None:
    """One line for the user on stderr (the main process calls it)."""
    print(f"cadence: {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ reading
def run_contents(run_dir: Path, extra: bool = False) -> list[Path]:
    """What cadence wrote into ``run_dir`` (its files, tracker folders and its own checkpoint folders)."""
    from .checkpoint.format import TMP_PREFIX
    from .checkpoint.store import NAME, written_by_cadence

    if not run_dir.is_dir():
        return []
    names = [*FILES, *(f"final/{n}" for n in FINAL), *TRACKERS, *(EXTRA if extra else ())]
    found = [run_dir / n for n in names if (run_dir / n).exists()]
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir():
        found += sorted(p for p in checkpoints.iterdir() if p.is_dir() and (
            (NAME.match(p.name) and written_by_cadence(p)) or p.name.startswith(TMP_PREFIX)))
    return found


def _shown(path: str | Path) -> str:
    text = str(path)
    return text if len(text) <= 80 else text[:40] + "..." + text[-30:]


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a name too long to even look up
        return False


def check_writable(path: Path, name: str = "run_dir") -> None:
    """Raise the one-sentence error when ``path`` could not be created or written (read only, no mkdir)."""
    existing = path
    while not _exists(existing) and existing != existing.parent:
        existing = existing.parent
    limit = 255
    with suppress(OSError, ValueError):
        limit = os.pathconf(existing if existing.is_dir() else existing.parent, "PC_NAME_MAX")
    if any(len(os.fsencode(part)) > limit for part in path.parts):
        raise bad(name, _shown(path), f"a folder name in it is longer than the file system allows ({limit} "
                  "bytes); choose a shorter name.")
    if not existing.is_dir():
        raise bad(name, _shown(path), f"cannot write there: {existing} is a file, not a folder; choose a folder "
                  "path.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise bad(name, _shown(path), f"cannot write there ({existing} is read-only for this user); choose a "
                  "folder you can write to.")


def check_run_dir(run_dir: Path, overwrite: bool, fresh: bool = True, name: str = "run_dir") -> None:
    """Checks that only read: ``run_dir`` can be written, and (for a fresh run) holds no run unless
    ``overwrite``. ``fit()`` repeats the second check under the lock."""
    check_writable(run_dir, name)
    if run_dir.exists() and not run_dir.is_dir():
        raise bad(name, str(run_dir), "it is a file; choose a folder path.")
    if fresh and not overwrite:
        refuse_existing_run(run_dir, name)


def refuse_existing_run(run_dir: Path, name: str = "run_dir") -> None:
    found = run_contents(run_dir)
    holder = lock_holder(run_dir) if found else None
    if holder is not None and holder != str(os.getpid()):  # the run there is still training: that is the news
        raise bad(name, str(run_dir), f"another process (PID {holder}) is training in this folder now; wait for it "
                  "to end, stop it, or choose another folder.")
    if found:
        shown = ", ".join(str(p.relative_to(run_dir)) for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise bad(name, str(run_dir), f"the folder already holds a run ({shown}); continue it with resume='auto' "
                  "(--resume), choose another folder, or pass overwrite=True (--overwrite) to replace it.")


def foreign_config(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a ``config.yaml`` that cadence fit did not write (no mark, no run beside it)."""
    path = run_dir / CONFIG
    if not path.is_file() or run_contents(run_dir):
        return False
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline() != CONFIG_MARK
    except OSError:
        return True


def check_config_file(run_dir: Path, overwrite: bool, name: str = "--run-dir") -> None:
    """cadence fit writes ``RUN/config.yaml``: a file of that name it did not write is replaced only with
    ``--overwrite`` (read only)."""
    if not overwrite and foreign_config(run_dir):
        raise bad(name, str(run_dir), f"the folder holds a {CONFIG} that cadence fit did not write, and the run "
                  f"writes its own there; move your file, choose another folder, or pass --overwrite to replace it.")


FIXES = {errno.ENOSPC: "free some space; what was saved before is intact",
         getattr(errno, "EDQUOT", -1): "free some space or raise your quota; what was saved before is intact",
         errno.ENAMETOOLONG: "choose a shorter name", errno.EROFS: "choose a folder you can write to",
         errno.EACCES: "choose a folder you can write to", errno.EPERM: "choose a folder you can write to"}


def describe_os_error(err: OSError) -> str:
    """One sentence for an ``OSError`` (read-only folder, full disk, over-long name): the file, why, the fix."""
    where = _shown(err.filename) if err.filename else "a file"
    if err.errno in FIXES:
        return f"cannot write {where} ({err.strerror}); {FIXES[err.errno]}."
    return f"{where}: {err.strerror or err}."


def os_error(err: OSError, name: str = "run_dir", path: Path | None = None) -> ConfigError:
    """An ``OSError`` met while writing the run folder, as the ConfigError naming the argument."""
    return ConfigError(f"{name}={_shown(path or err.filename or '?')!r}: {describe_os_error(err)}")


# ------------------------------------------------------------------------------------------------ writing
def clear_run(run_dir: Path) -> list[str]:
    """Remove what cadence wrote into ``run_dir`` (and nothing else); the removed paths, relative."""
    removed = []
    for path in run_contents(run_dir, extra=True):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        removed.append(str(path.relative_to(run_dir)))
    for folder in ("final", "checkpoints", "profile"):  # left only when they hold a user's files
        with suppress(OSError):
            (run_dir / folder).rmdir()
    return removed


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write ``path`` whole or not at all (a full disk leaves the old file as it was), with the umask."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    data = content.encode("utf-8") if isinstance(content, str) else content
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise


def unique_run_dir(base: Path) -> Path:
    """Make a new folder ``base`` (or ``base-2``, ``base-3``, ...) atomically: runs started in the same
    second never share one."""
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        for i in itertools.count(1):
            path = base if i == 1 else base.with_name(f"{base.name}-{i}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as err:
        raise os_error(err, "--run-dir", base) from None
    raise AssertionError("unreachable")


@contextmanager
def removed_on_failure(path: Path, made: bool) -> Iterator[None]:
    """A folder made for this run is removed again (when still empty) if the run fails before writing."""
    try:
        yield
    except BaseException:
        if made:
            with suppress(OSError):
                path.rmdir()
        raise


# The descriptors of the locks this process holds. flock belongs to the open file description, which a fork
# shares: each child closes its copies at once (closing, not unlocking, which would free the parent's lock too).
# An exec'ed child never gets them: os.open makes descriptors close-on-exec.
_HELD: set[int] = set()


def _drop_inherited_locks() -> None:
    for fd in _HELD:
        with suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


class RunLock:
    """``fcntl.flock`` on ``RUN/.lock``, which holds the owner's PID; the file is removed on release. Held by
    this process alone: its forked children close their copy of the descriptor (see ``_HELD``)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.path = run_dir, run_dir / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None or self._fd is not None:
            return
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise ConfigError(f"run_dir={str(self.run_dir)!r}: another process (PID {holder}) is training "
                                      "in this folder now; wait for it to end, stop it, or choose another folder."
                                      ) from None
                if _same_file(fd, self.path):
                    break
                os.close(fd)  # the holder removed the file between our open and our lock: take the new one
            _HELD.add(fd)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as err:
            raise os_error(err, "run_dir", self.run_dir) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with suppress(OSError):  # removed while still locked, so a process waiting on the old file retries
            os.unlink(self.path)
        _HELD.discard(self._fd)
        os.close(self._fd)
        self._fd = None


def lock_holder(run_dir: Path) -> str | None:
    """The PID of the process training in ``run_dir`` now (its lock is held), or None."""
    if fcntl is None:
        return None
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return os.read(fd, 32).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


class RunFolder:
    """The run folder of one ``Trainer``: checked when it is built, locked while ``fit()`` runs, and claimed
    (cleared with ``overwrite``) and given its ``config.yaml`` only once resuming has succeeded."""

    def __init__(self, path: Path, overwrite: bool, resume: Any, is_main: bool) -> None:
        self.path, self.overwrite, self.fresh, self.is_main = Path(path), overwrite, resume is None, is_main
        self.config_yaml: str | None = None  # cadence fit's resolved config, written as config.yaml at start
        self._lock = RunLock(self.path)
        self._claimed = False
        if is_main:
            check_run_dir(self.path, overwrite, fresh=self.fresh)

    def lock(self, strategy: Any = None) -> None:
        """Take the lock (rank 0); every rank fails together when it is held elsewhere."""
        error = None
        if self.is_main:
            try:
                self._lock.acquire()
            except ConfigError as err:
                error = err
        if strategy is not None and strategy.any(error is not None) and error is None:
            self.unlock()
            raise ConfigError(f"run_dir={str(self.path)!r}: rank 0 could not take the run folder (see its error).")
        if error is not None:
            raise error

    def unlock(self) -> None:
        self._lock.release()

    def start(self) -> None:
        """Under the lock, after resuming: claim the folder once (clearing it with ``overwrite``), write
        ``config.yaml``. Main process only."""
        if not self.is_main:
            return
        try:
            if self.fresh and not self._claimed:
                if not self.overwrite:
                    refuse_existing_run(self.path)
                    if self.config_yaml is not None:
                        check_config_file(self.path, self.overwrite)
                foreign = self.config_yaml is not None and foreign_config(self.path)
                removed = clear_run(self.path)
                if removed:
                    notice(f"overwrite: removed {', '.join(removed)} from {self.path}")
                if foreign:
                    notice(f"overwrite: replaced {CONFIG} (not written by cadence fit) in {self.path}")
            self._claimed = True
            if self.config_yaml is not None:
                write_atomic(self.path / CONFIG, CONFIG_MARK + self.config_yaml)
                self.config_yaml = None
        except OSError as err:
            raise os_error(err, "run_dir", self.path) from None


# ------------------------------------------------------------------------------------------------ resume
def check_resume(folder: Path | None, resume: Any, run_dir: Path | None, max_steps: int | None,
                 step: int, is_main: bool) -> None:
    """Before a checkpoint is loaded: a ``max_steps`` below its step is an error; no usable checkpoint for
    ``resume="auto"`` is said (training starts from step 0) rather than silent."""
    from .checkpoint.format import read_json

    if folder is None:
        if str(resume) == "auto" and step == 0 and is_main:
            where = run_dir / "checkpoints" if run_dir is not None else "the run folder"
            notice(f"resume: no usable checkpoint in {where}; starting from step 0")
        return
    saved = read_json(folder / "trainer.json").get("step")
    if max_steps is not None and isinstance(saved, int) and saved > max_steps:
        raise bad("max_steps", max_steps, f"the checkpoint {folder} is already at step {saved}; raise max_steps "
                  f"(--trainer.max_steps) to at least {saved}, or start a new run.")


def stop_message(step: int, run_dir: Path | None, saved: bool) -> str:
    """What a stop signal did, and how to continue."""
    if run_dir is None or not saved:
        return f"stopped at step {step}; no run folder, so nothing was saved"
    return f"stopped at step {step}, checkpoint saved: resume with `cadence fit --resume {run_dir}`"


def records_until(path: Path, step: int, count: int | None = None) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` written before a checkpoint: its first ``count`` records (or, for a
    checkpoint that does not say, those up to ``step``); the rest (and damaged lines) are dropped from the file,
    which is replaced whole."""
    from .loggers.jsonl import encode, read_jsonl

    if not path.exists():
        return []
    records = read_jsonl(path)
    kept = records[:count] if count is not None else [r for r in records if r["step"] <= step]
    if killpoints.ACTIVE:
        killpoints.reached("metrics.truncate", step)
    write_atomic(path, "".join(encode(r) for r in kept))
    if killpoints.ACTIVE:
        killpoints.reached("metrics.truncated", step)
    return kept
