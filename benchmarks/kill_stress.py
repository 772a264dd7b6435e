"""Random-kill stress of the demo (issue 26): SIGKILL `cadence fit` at a random moment after its first
checkpoint, `cadence fit --resume RUN`, compare the final weights with an uninterrupted run, bit for bit.

    .venv/bin/python benchmarks/kill_stress.py --kills 100 [--steps 240] [--every 7] [--out /tmp/kill-stress]

Each kill's moment is drawn over the training after the first checkpoint, whatever the machine's load: after a
checkpoint drawn at random, at a random fraction of the time the previous interval between checkpoints took
(the last interval holds the end of the run: the last steps and validation, the last checkpoint, final/). A run
folder as the kill left it is kept beside every resume that differs, with what was on disk then, so the phase
can be read off it. Prints one line per kill and a summary.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def command(run: Path, steps: int, every: int) -> list[str]:
    return [sys.executable, "-m", "cadence", "fit", "--trainer.max_steps", str(steps), "--trainer.checkpoint_every",
            str(every), "--trainer.progress", "false", "--run-dir", str(run)]


def appeared(run: Path, step: int, proc: subprocess.Popen) -> float:
    """The moment the checkpoint of ``step`` is there (polled every millisecond)."""
    folder = run / "checkpoints" / f"step-{step:09d}"
    while not folder.is_dir():
        if proc.poll() is not None:
            raise SystemExit(f"the run ended before its checkpoint {step}: {proc.returncode}")
        time.sleep(0.001)
    return time.monotonic()


def on_disk(run: Path) -> str:
    """What the kill left: the checkpoints, temporary folders, final/ and the metrics' last step."""
    names = sorted(p.name for p in (run / "checkpoints").iterdir()) if (run / "checkpoints").is_dir() else []
    last = [n for n in names if n.startswith("step-")][-1:]
    tmp = [n for n in names if n.startswith(".tmp")]
    final = sorted(p.name for p in (run / "final").iterdir()) if (run / "final").is_dir() else []
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    return f"last={last} tmp={tmp} final={final} records={len(lines)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--every", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("/tmp/kill-stress"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    rng = random.Random(args.seed)

    reference = args.out / "reference"
    subprocess.run(command(reference, args.steps, args.every), env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True)
    want = load_file(reference / "final" / "model.safetensors")
    checkpoints = list(range(args.every, args.steps, args.every))

    differ = 0
    for i in range(args.kills):
        run = args.out / f"run-{i:03d}"
        proc = subprocess.Popen(command(run, args.steps, args.every), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        # a moment uniform over the training after the first checkpoint, whatever the machine's load: a random
        # interval between two checkpoints, at a random fraction of the time the interval before it took
        k, fraction = rng.randrange(len(checkpoints)), rng.random()
        earlier = appeared(run, checkpoints[k - 1], proc) if k else None
        at = appeared(run, checkpoints[k], proc)
        interval = at - earlier if earlier is not None else 0.01
        time.sleep(fraction * interval)
        delay = time.monotonic() - at
        proc.send_signal(signal.SIGKILL)
        code = proc.wait()
        state = on_disk(run)
        kept = args.out / f"run-{i:03d}.killed"
        shutil.copytree(run, kept, symlinks=True)
        resumed = subprocess.run([sys.executable, "-m", "cadence", "fit", "--resume", str(run)], env=env,
                                 capture_output=True, text=True)
        got = load_file(run / "final" / "model.safetensors") if resumed.returncode == 0 else {}
        same = got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        differ += not same
        print(f"kill {i:3d} {delay * 1000:.1f} ms after step {checkpoints[k]} (exit {code}): {state}; "
              f"resume exit {resumed.returncode}: {'bitwise' if same else 'DIFFERENT'}", flush=True)
        if not same:
            (args.out / f"run-{i:03d}.resume.txt").write_text(resumed.stdout + resumed.stderr)
        else:
            shutil.rmtree(kept)
            shutil.rmtree(run)
    print(f"{args.kills - differ} of {args.kills} kills resumed bitwise", flush=True)
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
