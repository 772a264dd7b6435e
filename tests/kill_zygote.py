"""A process that runs ``cadence`` commands for the kill-point tests, each in a fork of itself.

It imports cadence and torch once and computes nothing, so each fork starts at once with clean thread pools
(forking the test process itself, whose torch has run, could hang a child's OpenMP). One request a line on
stdin, as JSON: ``{"argv": [...], "cwd": "...", "kill": "NAME@STEP" or null, "env": {...}}``; one answer a
line on stdout: ``{"exit": code}`` or ``{"signal": number}`` for a child killed by a signal. The child's
output goes to ``cwd/out-<n>.txt``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import traceback

import torch  # noqa: F401  (imported once here, not in every child)
import torch._dynamo  # noqa: F401  (what torch.optim imports at its first optimizer: seconds on a busy machine)

from cadence import killpoints
from cadence.cli.main import main

for warm in ("sklearn.datasets", "cadence.trainer", "cadence.cli.fit", "cadence.demo"):
    try:
        importlib.import_module(warm)
    except ImportError:  # the demo's extra may be missing: its runs would fail, not this process
        pass


def serve() -> None:
    for n, line in enumerate(sys.stdin):
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.chdir(request["cwd"])
                os.environ.update(request.get("env") or {})
                out = os.open(f"out-{n}.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(out, 1)
                os.dup2(out, 2)
                killpoints.arm(request.get("kill"))
                code = main(request["argv"])
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        answer = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"exit": os.WEXITSTATUS(status)}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    serve()
