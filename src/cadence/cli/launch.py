"""``cadence fit --nproc N [--nnodes M --node-rank R --master-addr A --master-port P | --rdzv-endpoint E]``:
start the workers through torchrun's own launcher (``torch.distributed.run``), never a process manager of
our own. Each worker runs ``python -m cadence fit`` with the remaining arguments.

The launcher keeps the signal contract of a single process:

- The config is checked here, once, before any worker starts: a mistake is one ``cadence: error:`` line on
  stderr and exit code 2. A worker's own error is printed by rank 0; every worker also leaves it in a folder
  of the launcher's (``CADENCE_ERRORS``), and the launcher prints, naming the rank, each one rank 0 did not
  print (an error on rank 1 only is shown, an error on every rank once).
- SIGTERM, SIGINT and SIGUSR1 to the launcher (or its process group: torchrun starts each worker in a session
  of its own, so a worker gets the signal once, from the launcher) are forwarded to every worker; the workers
  agree on the step, save and exit, torchrun waits for them, and the launcher exits ``128 + signal``
  (143, 130, 138). A signal that arrives while the nodes are still meeting stops the launcher at once.
- No worker outlives the launcher: each one asks the kernel for SIGKILL when its parent dies (Linux), so even
  a SIGKILLed launcher leaves none behind.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import ConfigError
from ..rundir import unique_run_dir

LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port", "--rdzv-endpoint",
                "--rdzv-id", "--max-restarts")
FORWARDED = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"  # torchrun forwards these to every worker
SHUTDOWN_TIMEOUT = 600  # seconds torchrun waits for the workers to save before it kills them
LAUNCHER_PID = "CADENCE_LAUNCHER_PID"
ERRORS = "CADENCE_ERRORS"  # the folder where each worker leaves its error, for the launcher to show


_errors_folder: str | None = None  # a worker's: taken from the environment by die_with_launcher


def leave_error(text: str) -> None:
    """In a worker of ``cadence fit --nproc``: leave this rank's error for the launcher (it may not be rank 0's)."""
    folder = _errors_folder
    if folder:
        with contextlib.suppress(OSError):
            Path(folder, f"rank-{int(os.environ.get('RANK') or 0):05d}.txt").write_text(text, encoding="utf-8")


def show_worker_errors(folder: Path) -> None:
    """The errors the workers left that rank 0 did not print (its own is on stderr already), once each."""
    texts = {int(p.stem.split("-")[1]): p.read_text(encoding="utf-8", errors="replace")
             for p in sorted(folder.glob("rank-*.txt"))}
    shown = {texts.get(0)}
    for rank, text in sorted(texts.items()):
        if text not in shown:
            print(f"cadence: error: rank {rank}: {text}", file=sys.stderr, flush=True)
            shown.add(text)


def wants_launch(argv: list[str]) -> bool:
    return argv[:1] == ["fit"] and any(a.split("=")[0] == "--nproc" for a in argv)


def split_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The launcher's own flags, and the rest (for ``cadence fit`` in each worker)."""
    parser = argparse.ArgumentParser(prog="cadence fit", add_help=False, exit_on_error=False)
    parser.add_argument("--nproc", type=int, required=True)
    parser.add_argument("--nnodes", default="1")
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--master-addr", default="127.0.0.1")
    parser.add_argument("--master-port", type=int, default=29500)
    parser.add_argument("--rdzv-endpoint", default=None)
    parser.add_argument("--rdzv-id", default="cadence")
    parser.add_argument("--max-restarts", type=int, default=0)
    try:
        known, rest = parser.parse_known_args(argv[1:])
    except argparse.ArgumentError as err:  # e.g. "argument --nproc: invalid int value: 'x'"
        raise ConfigError(f"{err}; give a whole number (see `cadence fit --help`).") from None
    if known.nproc < 1:
        raise ConfigError(f"--nproc={known.nproc}: use a positive number of processes per machine.")
    return known, rest


def torchrun_args(known: argparse.Namespace, rest: list[str]) -> list[str]:
    args = ["--nproc-per-node", str(known.nproc), "--nnodes", known.nnodes, "--max-restarts",
            str(known.max_restarts), "--signals-to-handle", FORWARDED, "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)]
    if known.rdzv_endpoint:
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", known.rdzv_endpoint, "--rdzv-id", known.rdzv_id]
    else:
        args += ["--node-rank", str(known.node_rank), "--master-addr", known.master_addr,
                 "--master-port", str(known.master_port)]
    return [*args, "-m", "cadence", "fit", *rest]


def waiting_note(known: argparse.Namespace) -> str | None:
    """What a launcher of several nodes waits for, printed before the rendezvous (which may take a while)."""
    if known.nnodes in ("1", "1:1"):
        return None
    if known.rdzv_endpoint:
        return (f"cadence: waiting for {known.nnodes} nodes to join the rendezvous {known.rdzv_id!r} at "
                f"{known.rdzv_endpoint} (each runs the same command); Ctrl-C stops.")
    others = "node 0" if known.node_rank else f"nodes 1..{int(known.nnodes.split(':')[-1]) - 1}"
    return (f"cadence: node {known.node_rank} of {known.nnodes} waiting for {others} at "
            f"{known.master_addr}:{known.master_port} (the same command with --node-rank set); Ctrl-C stops.")


def launch(argv: list[str], check: Callable[[list[str]], None]) -> int:
    """Check the config, split off the launcher's flags and hand the rest to torchrun; the exit code."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException

    known, rest = split_args(argv)
    check(rest)  # once, here: a mistake is reported once, before any worker starts
    if not any(a.split("=")[0] in ("--run-dir", "--run_dir", "--resume") for a in rest):
        # one folder for every rank (a timestamp taken by each worker could differ by a second)
        # (made here, atomically: two launchers started in the same second get two folders)
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        rest += ["--run-dir", str(unique_run_dir(Path("runs") / f"{stamp}-distributed"))]
    # Until torchrun starts the workers (and installs its handlers), the nodes meet in a blocking C++ call that a
    # Python handler cannot interrupt: a stop signal then ends the launcher by the kernel's default action.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    os.environ[LAUNCHER_PID] = str(os.getpid())
    if known.nproc > 1:  # what torchrun does too, without its four-line banner about it
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    # torchrun's "failed (exitcode: 2)" and "Sending process closing signal" lines: the workers say it better
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    note = waiting_note(known)
    if note:
        print(note, file=sys.stderr, flush=True)
    errors = Path(tempfile.mkdtemp(prefix="cadence-errors-"))
    os.environ[ERRORS] = str(errors)
    try:
        torchrun.main(torchrun_args(known, rest))
    except SignalException as stop:
        return 128 + int(stop.sigval)
    except SystemExit as stop:
        return int(stop.code or 0)
    except Exception as err:  # torchrun raises ChildFailedError when a worker fails
        show_worker_errors(errors)
        return worker_failure(err)
    finally:
        os.environ.pop(ERRORS, None)
        shutil.rmtree(errors, ignore_errors=True)
    return 0


def worker_failure(err: Exception) -> int:
    """The exit code for failed workers: a config error (rank 0 printed it) is 2, a stop signal 128 + N."""
    codes = sorted({f.exitcode for f in getattr(err, "failures", {}).values()})
    if 2 in codes:
        return 2
    stops = [c for c in codes if c in (130, 138, 143) or -c in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)]
    if stops and len(stops) == len(codes):
        return stops[0] if stops[0] > 0 else 128 - stops[0]
    print(f"cadence: error: a worker failed ({type(err).__name__}, exit codes {codes}); its error is above.",
          file=sys.stderr)
    return 1


def die_with_launcher() -> None:
    """In a worker of ``cadence fit --nproc``: ask Linux to SIGKILL this process when the launcher dies."""
    global _errors_folder
    launcher = os.environ.pop(LAUNCHER_PID, None)  # popped: a process this worker starts is no worker
    _errors_folder = os.environ.pop(ERRORS, None) if launcher else None
    if not launcher or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(launcher):  # the launcher died before the request took effect
        os._exit(1)
