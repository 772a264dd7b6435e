"""How much memory a rank needs while it loads a checkpoint written at another world size (FSDP resharding).

A model of ``--layers`` x ``Linear(--width, --width)`` (3 x 4096: 201 MB of weights, 604 MB of checkpoint with
AdamW's state) trains one step and is saved twice: by one process (``model.safetensors``, whole tensors) and by
two FSDP ranks (``model-rankNNNNN.safetensors``, half of every tensor each). Each checkpoint is then loaded by
one process and by two FSDP ranks, each load in fresh processes: the same layout (the baseline) and the other one
(resharded: FSDP 2 -> 1 and 1 -> 2). Every process builds its ``Trainer``, returns freed memory to the system
(the GC, glibc's ``malloc_trim``), resets its peak RSS (``/proc/self/clear_refs``), loads the checkpoint
(``restore``: the weights, the optimizer state, the rest) and reads its peak RSS (``VmHWM``) and RSS after.

usage: python benchmarks/reshard_memory.py [--layers 3] [--width 4096] [--folder DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from cadence import Trainer
from cadence.checkpoint.snapshot import restore
from cadence.checkpoint.state import local
from cadence.checkpoint.store import find_resume

MB = 2**20


class Net(nn.Module):
    def __init__(self, layers: int, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).pow(2).mean()


def status(field: str) -> float:
    """A ``/proc/self/status`` field (``VmHWM``, ``VmRSS``) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def trainer(args: argparse.Namespace, run: Path, resume: Path | None) -> Trainer:
    torch.manual_seed(0)
    model = Net(args.layers, args.width)
    data = torch.randn(16, args.width)
    world = int(os.environ.get("WORLD_SIZE", 1))
    return Trainer(model, data, batch_size=8 // world, max_steps=1, lr=1e-4, device="cpu", progress=False,
                   strategy="fsdp" if world > 1 else "single", run_dir=run, checkpoint_every=1,
                   resume=resume, log_every=1)


def save(args: argparse.Namespace) -> None:
    trainer(args, Path(args.into), None).fit()


def load(args: argparse.Namespace) -> None:
    t = trainer(args, Path(args.into), Path(args.ckpt))
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS starts again from the RSS now
    restore(t, find_resume(t.resume, t.checkpoints, keep=t.world_size == 1))  # verified, then loaded
    state = sum(local(v).numel() * v.element_size() for s in t.optimizer.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    rank = int(os.environ.get("RANK", 0))
    report = {"rank": rank, "before": before, "peak": status("VmHWM"), "after": status("VmRSS"), "state": state / MB}
    Path(f"{args.into}-rank{rank}.json").write_text(json.dumps(report))


def launch(args: argparse.Namespace, role: str, nproc: int, run: Path, checkpoint: Path | None = None) -> list[dict]:
    own = [__file__, "--stage", role, "--layers", str(args.layers), "--width", str(args.width), "--into", str(run)]
    own += ["--ckpt", str(checkpoint)] if checkpoint is not None else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, *own]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
               "127.0.0.1", "--master-port", str(port), *own]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-4000:])
    return [json.loads(Path(f"{run}-rank{r}.json").read_text()) for r in range(nproc)] if role == "load" else []


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--folder", default=None)
    parser.add_argument("--stage", default="main", choices=["main", "save", "load"])
    parser.add_argument("--into", default=None)
    parser.add_argument("--ckpt", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.stage != "main":
        return save(args) if args.stage == "save" else load(args)
    root = Path(tempfile.mkdtemp(prefix="reshard-", dir=args.folder))
    try:
        weights = sum(p.numel() * p.element_size() for p in Net(args.layers, args.width).parameters()) / MB
        print(f"model: {args.layers} x Linear({args.width}, {args.width}): {weights:.0f} MiB of weights, "
              f"{3 * weights:.0f} MiB with AdamW's state")
        checkpoints = {}
        for name, nproc in (("one process", 1), ("two FSDP ranks", 2)):
            run = root / f"saved-{nproc}"
            launch(args, "save", nproc, run)
            checkpoints[name] = (nproc, sorted((run / "checkpoints").glob("step-*"))[-1])
        print("| checkpoint of | loaded by | rank | RSS before | peak RSS during load | peak - before | RSS after "
              "| optimizer state loaded |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for saved, (saved_n, checkpoint) in checkpoints.items():
            for nproc in (1, 2):
                loader = "one process" if nproc == 1 else "two FSDP ranks"
                kind = "same layout" if nproc == saved_n else "resharded"
                run = root / f"load-{saved_n}-{nproc}"
                for r in launch(args, "load", nproc, run, checkpoint):
                    print(f"| {saved} | {loader} ({kind}) | {r['rank']} | {r['before']:.0f} MiB | "
                          f"{r['peak']:.0f} MiB | {r['peak'] - r['before']:.0f} MiB | {r['after']:.0f} MiB | "
                          f"{r['state']:.0f} MiB |", flush=True)
                shutil.rmtree(run, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
