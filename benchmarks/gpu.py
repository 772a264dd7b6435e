"""cadence against a hand-written loop on a GPU (issue 10): tokens/s, MFU, peak memory, host syncs.

A GPT-2-small-size language model (12 layers, width 768, 12 heads, 1024 positions, vocabulary 50257, tied
embeddings, about 124M parameters) trains on random tokens held on the GPU, with bf16 autocast,
``torch.compile`` and fused AdamW (lr 3e-4, weight decay 0.1 on matrices), clipping at norm 1.0, batch 8 x
1024 tokens, reading the loss every 50 steps. Both loops start from the same weights and visit the same
sequences in the same order (the data order contract).

- hand: ``torch.compile(model)``, ``AdamW(fused=True)``, ``autocast(bfloat16)``, ``x[idx]`` slices of each
  epoch's permutation, ``loss.item()`` at log points;
- cadence: ``Trainer(torch.compile(model), tokens, precision="bf16", optimizer="adamw", ...)``;
- max: ``Trainer(model, ..., compile="max")``: cadence compiles the model and also the clip and the fused AdamW
  step (issue 17).

Timing: after ``--warmup`` steps (compilation included), the next ``--steps`` steps are timed between two
``torch.cuda.synchronize()`` calls; the loops alternate ``--repeats`` times. MFU counts 6 x parameters + 12 x
layers x width x sequence FLOPs per token against the GPU's dense bf16 peak (989 TFLOP/s for H100/H200 SXM;
``--peak-tflops`` for others). Peak memory is ``torch.cuda.max_memory_allocated()`` of each loop's run.

Host syncs: a separate cadence run sets ``torch.cuda.set_sync_debug_mode("error")`` from its first step on and
lifts it only around each log point's read (a callback at the log step and at ``on_log``), so any host-device
sync anywhere else in the loop raises.

    python benchmarks/gpu.py                       # on a CUDA machine (about 5 minutes on one H100)
    python benchmarks/gpu.py --smoke               # a tiny model on the CPU, no compile: checks the script runs
    python benchmarks/gpu.py --smoke --smoke-max   # the same, with the compile="max" loop too (compiles on the CPU)
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import cadence
from cadence import Trainer


@dataclass
class Config:
    layers: int = 12
    width: int = 768
    heads: int = 12
    seq: int = 1024
    vocab: int = 50257
    batch: int = 8
    sequences: int = 2048  # items of the in-memory dataset (random tokens)


class Block(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.heads = c.heads
        self.norm1, self.norm2 = nn.LayerNorm(c.width), nn.LayerNorm(c.width)
        self.qkv, self.proj = nn.Linear(c.width, 3 * c.width), nn.Linear(c.width, c.width)
        self.mlp = nn.Sequential(nn.Linear(c.width, 4 * c.width), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * c.width, c.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, c: Config) -> None:
        super().__init__()
        self.embed = nn.Embedding(c.vocab, c.width)
        self.pos = nn.Parameter(torch.randn(c.seq, c.width) * 0.01)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x, y = tokens[:, :-1], tokens[:, 1:]
        h = self.embed(x) + self.pos[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        logits = self.norm(h) @ self.embed.weight.t()  # tied embeddings
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def flops_per_token(model: nn.Module, c: Config) -> float:
    params = sum(p.numel() for p in model.parameters())
    return 6 * params + 12 * c.layers * c.width * c.seq


# ------------------------------------------------------------------------------------------------ loops
def hand_run(model: nn.Module, tokens: torch.Tensor, c: Config, args: argparse.Namespace, device: torch.device,
             timing: list[float]) -> nn.Module:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, **fused)
    compiled = torch.compile(model) if args.compile else model
    compiled.train()
    total, step, epoch, losses = args.warmup + args.steps, 0, 0, []
    while step < total:
        perm = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(tokens) - c.batch + 1, c.batch):
            if step == args.warmup:
                sync(device)
                start = time.perf_counter()
            idx = perm[i:i + c.batch].to(tokens.device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = compiled(tokens.index_select(0, idx))
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % args.log_every == 0:
                losses.append(loss.item())
            if step == total:
                break
        epoch += 1
    sync(device)
    timing.append(time.perf_counter() - start)
    return model


class StepClock:
    """Synchronizes and reads the clock at the start of the timed steps and at the end."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device, self.start = warmup, device, 0.0

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.step == self.warmup:
            sync(self.device)
            self.start = time.perf_counter()


def cadence_trainer(model: nn.Module, tokens: torch.Tensor, c: Config, args: argparse.Namespace,
                    device: torch.device, steps: int, callbacks: list[Any], compile: bool | str = False) -> Trainer:
    """cadence on ``torch.compile(model)`` (compiled by the user, as the hand loop does), or with ``compile=``."""
    compiled = torch.compile(model) if args.compile and not compile else model
    return Trainer(compiled, tokens, batch_size=c.batch, max_steps=steps, optimizer="adamw", lr=args.lr,
                   weight_decay=0.1, max_grad_norm=1.0, precision="bf16", log_every=args.log_every,
                   progress=False, device=str(device), callbacks=callbacks, drop_last=True, compile=compile)


def cadence_run(model: nn.Module, tokens: torch.Tensor, c: Config, args: argparse.Namespace,
                device: torch.device, timing: list[float], compile: bool | str = False) -> nn.Module:
    clock = StepClock(args.warmup, device)
    cadence_trainer(model, tokens, c, args, device, args.warmup + args.steps, [clock], compile).fit()
    sync(device)
    timing.append(time.perf_counter() - clock.start)
    return model


def cadence_max_run(model: nn.Module, tokens: torch.Tensor, c: Config, args: argparse.Namespace,
                    device: torch.device, timing: list[float]) -> nn.Module:
    return cadence_run(model, tokens, c, args, device, timing, compile="max")


class SyncGuard:
    """Host-device syncs raise, except around the log points' reads."""

    def __init__(self, log_every: int) -> None:
        self.log_every = log_every

    def on_fit_start(self, trainer: Trainer) -> None:
        torch.cuda.set_sync_debug_mode("error")

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.step % self.log_every == 0 or trainer.step == 1:  # the log point's read follows (step 1 too)
            torch.cuda.set_sync_debug_mode("default")

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if record.get("split") == "train":
            torch.cuda.set_sync_debug_mode("error")

    def on_fit_end(self, trainer: Trainer) -> None:
        torch.cuda.set_sync_debug_mode("default")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="timed steps per run (default 100)")
    ap.add_argument("--warmup", type=int, default=30, help="untimed steps first, compilation included (default 30)")
    ap.add_argument("--repeats", type=int, default=3, help="alternated runs of each loop (default 3)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: 989 for "
                    "H100/H200, else MFU is not printed)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--smoke", action="store_true", help="a tiny model on the CPU without compile, 1 repeat")
    ap.add_argument("--no-max", dest="max", action="store_false", help='leave out the compile="max" loop')
    ap.add_argument("--smoke-max", action="store_true", help='with --smoke: run the compile="max" loop too')
    args = ap.parse_args(argv)

    if args.smoke:
        c = Config(layers=2, width=64, heads=4, seq=64, vocab=256, batch=4, sequences=64)
        args.compile, args.steps, args.warmup, args.repeats, args.log_every = False, 8, 2, 1, 4
        args.max = args.smoke_max
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU (use --smoke to check the script on the CPU)")
        return 0
    else:
        c = Config()
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(0)
    init = GPT(c)
    tokens = torch.randint(0, c.vocab, (c.sequences, c.seq + 1), generator=torch.Generator().manual_seed(1))
    tokens = tokens.to(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    peak = args.peak_tflops or (989.0 if any(g in name for g in ("H100", "H200")) else None)
    per_token = flops_per_token(init, c)
    print(f"GPU benchmark (issue 10): {name}; torch {torch.__version__}, cadence {cadence.__version__}")
    print(f"model: {sum(p.numel() for p in init.parameters()) / 1e6:.1f}M parameters, {c.layers} layers, width "
          f"{c.width}, seq {c.seq}, batch {c.batch}; bf16 autocast, compile={args.compile}, fused AdamW")
    print(f"{args.warmup} warm-up + {args.steps} timed steps, {args.repeats} alternated repeats", flush=True)

    loops = {"hand": hand_run, "cadence": cadence_run, **({"max": cadence_max_run} if args.max else {})}
    times: dict[str, list[float]] = {k: [] for k in loops}
    memory: dict[str, list[float]] = {k: [] for k in loops}
    weights: dict[str, nn.Module] = {}
    for r in range(args.repeats):
        for key in (list(loops) if r % 2 == 0 else list(loops)[::-1]):
            model = copy.deepcopy(init).to(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            weights[key] = loops[key](model, tokens, c, args, device, times[key])
            if device.type == "cuda":
                memory[key].append(torch.cuda.max_memory_allocated() / 2**30)
            print(f"  repeat {r + 1}: {key} {args.steps * c.batch * c.seq / times[key][-1]:,.0f} tokens/s",
                  flush=True)

    tokens_per_step = c.batch * c.seq
    print()
    print("| loop | median s | tokens/s | vs hand | MFU | peak allocated GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    hand = statistics.median(times["hand"])
    for key in loops:
        med = statistics.median(times[key])
        rate = args.steps * tokens_per_step / med
        mfu = f"{rate * per_token / (peak * 1e12):.1%}" if peak else "n/a"
        mem = f"{max(memory[key]):.2f}" if memory[key] else "n/a"
        print(f"| {key} | {med:.3f} | {rate:,.0f} | {hand / med:.3f}x | {mfu} | {mem} |")
    diff = max((a - b).abs().max().item() for a, b in zip(weights["hand"].parameters(),
                                                           weights["cadence"].parameters()))
    print(f"\nfinal weights, max abs difference cadence vs hand: {diff:.3g} (compiled bf16 kernels need not be "
          "bitwise deterministic)")
    if "max" in weights:
        diff_max = max((a - b).abs().max().item() for a, b in zip(weights["hand"].parameters(),
                                                                  weights["max"].parameters()))
        print(f"final weights, max abs difference compile='max' vs hand: {diff_max:.3g}")
        diff = max(diff, diff_max)

    if device.type == "cuda":
        steps = 2 * args.log_every + 10
        model = copy.deepcopy(init).to(device)
        cadence_trainer(model, tokens, c, args, device, steps, [SyncGuard(args.log_every)]).fit()
        print(f"host-device syncs between log points: none ({steps} steps under "
              "torch.cuda.set_sync_debug_mode('error'), lifted only around the log reads)")
    print(f"tokens/s goal: cadence >= 0.99x the hand-written loop: "
          f"{'met' if hand / statistics.median(times['cadence']) >= 0.99 else 'NOT met'}")
    if not math.isfinite(diff):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
