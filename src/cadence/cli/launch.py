"""``cadence fit --nproc N [--nnodes M --node-rank R --master-addr A --master-port P | --rdzv-endpoint E]``:
start the workers through torchrun's own launcher (``torch.distributed.run``), never a process manager of
our own. Each worker runs ``python -m cadence fit`` with the remaining arguments."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port", "--rdzv-endpoint",
                "--rdzv-id", "--max-restarts")


def wants_launch(argv: list[str]) -> bool:
    return argv[:1] == ["fit"] and any(a.split("=")[0] == "--nproc" for a in argv)


def launch(argv: list[str]) -> int:
    """Split off the launcher's flags and hand the rest to torchrun; returns the workers' exit code."""
    from torch.distributed import run as torchrun

    parser = argparse.ArgumentParser(prog="cadence fit", add_help=False)
    parser.add_argument("--nproc", type=int, required=True)
    parser.add_argument("--nnodes", default="1")
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--master-addr", default="127.0.0.1")
    parser.add_argument("--master-port", type=int, default=29500)
    parser.add_argument("--rdzv-endpoint", default=None)
    parser.add_argument("--rdzv-id", default="cadence")
    parser.add_argument("--max-restarts", type=int, default=0)
    known, rest = parser.parse_known_args(argv[1:])
    if known.nproc < 1:
        from ..errors import ConfigError

        raise ConfigError(f"--nproc={known.nproc}: use a positive number of processes per machine.")
    if not any(a.split("=")[0] in ("--run-dir", "--run_dir", "--resume") for a in rest):
        # one folder for every rank (a timestamp taken by each worker could differ by a second)
        rest += ["--run-dir", f"runs/{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-distributed"]
    args: list[Any] = ["--nproc-per-node", str(known.nproc), "--nnodes", known.nnodes,
                       "--max-restarts", str(known.max_restarts)]
    if known.rdzv_endpoint:
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", known.rdzv_endpoint, "--rdzv-id", known.rdzv_id]
    else:
        args += ["--node-rank", str(known.node_rank), "--master-addr", known.master_addr,
                 "--master-port", str(known.master_port)]
    args += ["-m", "cadence", "fit", *rest]
    try:
        torchrun.main(args)
    except SystemExit as stop:
        return int(stop.code or 0)
    except Exception as err:  # torchrun raises ChildFailedError when a worker fails; its report is printed
        print(f"cadence: a worker failed: {type(err).__name__}")
        return 1
    return 0
