"""One training run for the resume tests: importable (``build``) and runnable as a killable process.

    python tests/resume_worker.py RUN_DIR [--resume] [--max-steps N] [--checkpoint-every K] [--sleep S]
    python tests/resume_worker.py --serve

The run has everything exact resume must carry: dropout and batch norm (RNG and buffers), shuffling,
``grad_accum=2`` with a short last step per epoch, a cosine schedule with warm-up and gradient clipping.
It prints ``started N`` when training begins, ``step N`` after every optimizer step and ``done N`` at the end
(each line flushed), so a test can kill it at a chosen moment; on SIGTERM/SIGINT cadence saves and exits with
128 + the signal number.

``--serve`` imports torch and cadence once and then forks one such run per request line read from stdin
(``NAME RUN_DIR [options]``): ``NAME pid PID`` when it started, the run's own lines prefixed with ``NAME``,
and ``NAME exit CODE`` when it ended (a negative code: killed by that signal, as in ``subprocess``). A fork
starts in milliseconds where a fresh interpreter spends seconds importing torch, which keeps the multi-process
tests short; each fork is still a process of its own that a test can SIGKILL at any moment.
"""

from __future__ import annotations

import argparse
import os
import select
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cadence import Trainer  # noqa: E402
from helpers import make_data  # noqa: E402

N_ITEMS = 52  # batch 4 x grad_accum 2: 6 full steps and one of 4 items per epoch (7 steps)


class DropoutNet(nn.Module):
    """8 -> width (batch norm, dropout) -> 2; ``extra_layer`` adds a width -> width layer."""

    def __init__(self, width: int = 16, extra_layer: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Linear(8, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(0.25)]
        if extra_layer:
            layers += [nn.Linear(width, width), nn.ReLU()]
        layers.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(x), y)


class Items(Dataset):
    """A map-style dataset with a deterministic ``__getitem__`` (usable by DataLoader workers)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] * 1.0, self.y[i]


def settings(**overrides: Any) -> dict[str, Any]:
    kw: dict[str, Any] = dict(batch_size=4, grad_accum=2, max_steps=30, lr=0.05, warmup_steps=4, schedule="cosine",
                              min_lr=1e-3, max_grad_norm=0.5, shuffle=True, seed=3, log_every=2, device="cpu",
                              progress=False)
    kw.update(overrides)
    return kw


def build(run_dir: Path | str | None, data: Any = None, model: nn.Module | None = None, **overrides: Any) -> Trainer:
    """The run's Trainer (a fresh ``DropoutNet`` and 52 items unless given)."""
    return Trainer(model if model is not None else DropoutNet(),
                   data if data is not None else make_data(N_ITEMS, seed=1),
                   run_dir=run_dir, **settings(**overrides))


class StartedAt:
    """Records the step each ``fit()`` starts from (after a resume: the checkpoint's step)."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        self.steps.append(trainer.step)


PREFIX = ""  # set in a fork of --serve: its name, so that the server's output can be told apart


def say(text: str) -> None:
    """One line on stdout in a single write (atomic on a pipe), so lines of several forks never interleave
    (``print`` makes two writes, text and newline, when ``PYTHONUNBUFFERED`` is set)."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), f"{PREFIX}{text}\n".encode())


class Pace:
    """Prints progress (flushed) and sleeps a little after each step, so that kills land at chosen points."""

    def __init__(self, sleep: float) -> None:
        self.sleep = sleep

    def on_fit_start(self, trainer: Trainer) -> None:
        say(f"started {trainer.step}")

    def on_step_end(self, trainer: Trainer) -> None:
        say(f"step {trainer.step}")
        if self.sleep:
            time.sleep(self.sleep)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--max-steps", type=int, default=30)
    parser.add_argument("--checkpoint-every", type=int, default=None)
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the tests' in-process reference runs use one thread too: same arithmetic
    trainer = build(args.run_dir, resume="auto" if args.resume else None, max_steps=args.max_steps,
                    checkpoint_every=args.checkpoint_every, callbacks=[Pace(args.sleep)])
    trainer.fit()
    say(f"done {trainer.step}")
    return 0


def run_fork(name: str, args: list[str]) -> int:
    """The body of one fork of ``--serve``: the run's stderr goes to ``RUN_DIR.stderr``."""
    global PREFIX
    PREFIX = f"{name} "
    err = os.open(f"{args[0].rstrip('/')}.stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(err, 2)
    try:
        return main(args)
    except SystemExit as stop:  # cadence's exit after a stop signal: 128 + the signal number
        return stop.code if isinstance(stop.code, int) else 1
    except KeyboardInterrupt:  # SIGINT, after its checkpoint: exit 130 as cadence fit does
        return 130
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def serve() -> int:
    torch.set_num_threads(1)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # imports torch._dynamo now, once for every fork
    children: dict[int, str] = {}
    pending = b""
    stdin_open = True
    while stdin_open or children:
        ready, _, _ = select.select([0] if stdin_open else [], [], [], 0.005)
        if ready:
            chunk = os.read(0, 65536)
            stdin_open = bool(chunk)
            pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            name, *args = shlex.split(line.decode())
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                os._exit(run_fork(name, args))
            children[pid] = name
            say(f"{name} pid {pid}")
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            say(f"{children.pop(pid)} exit {os.waitstatus_to_exitcode(status)}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        code = serve()
        sys.stdout.flush()
        os._exit(code)  # no interpreter teardown: the test waiting for the server does not wait for torch's
    sys.exit(main())
