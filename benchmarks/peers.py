"""cadence against the trainers people would pick instead (issue 10): time, memory and import cost.

The same training -- same data, same initial weights (a deepcopy of one model), same data order, same
optimizer (AdamW, lr 1e-3, no weight decay), same clipping (norm 1.0), fp32 on the CPU with one thread -- runs
under six loops:

  hand      a hand-written loop slicing in-memory tensors with the data order contract's indices
            (epoch ``e`` visits ``torch.randperm(N, generator=torch.Generator().manual_seed(seed + e))`` in
            consecutive slices), the baseline every ratio is taken against;
  hand-dl   the same hand-written loop fed by the DataLoader that the peers get (below): the floor a peer
            fed by a DataLoader could reach;
  cadence   ``Trainer((x, y), ...).fit()`` (its in-memory path, the same indices);
  accel     Hugging Face Accelerate: ``Accelerator()`` + ``prepare(model, optimizer, loader)`` +
            ``accelerator.accumulate`` + ``accelerator.backward`` + ``accelerator.clip_grad_norm_``;
  fabric    Lightning Fabric: ``Fabric(accelerator="cpu", devices=1)`` + ``setup`` + ``setup_dataloaders`` +
            ``no_backward_sync`` + ``fabric.backward`` + ``fabric.clip_gradients``;
  lightning the Lightning Trainer: a LightningModule, ``Trainer(accelerator="cpu", devices=1, max_steps=...,
            gradient_clip_val=1.0, accumulate_grad_batches=..., logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)`` (in val+log a list
            ``Logger`` replaces ``logger=False``).

The peers are fed a ``DataLoader`` whose ``batch_sampler`` yields exactly the contract's index slices (epoch
``e`` counted by the sampler itself, so no framework's ``set_epoch`` convention matters) over a dataset with a
``__getitems__`` that indexes the tensors (``x[idx], y[idx]``), so that batch assembly costs what cadence's and
the hand loop's slicing costs and the DataLoader adds only its iterator; ``hand-dl`` measures that iterator.

Cases: a tiny MLP (32 wide, batch 64: per-step overhead) and a small causal transformer language model on
random tokens (2 layers, d_model 64, 4 heads, seq 64, vocab 256, batch 16: tokens/s), each

  plain     no logging (every loop reads the loss once, at the end);
  accum4    ``grad_accum=4`` over the same micro-batches (a quarter of the optimizer steps);
  val+log   the loss logged every 50 steps and validation every ``steps/4`` steps (4 validations, the last at
            the last step). Every loop sends its records to an in-memory list: cadence's ``history``
            (``log_every=50``, ``val_every``); Lightning ``self.log`` in ``training_step``/``validation_step`` with
            ``log_every_n_steps=50`` and ``val_check_interval`` and a list ``Logger``; Fabric ``fabric.log`` every
            50 steps to a list ``Logger``; Accelerate ``accelerator.log`` every 50 steps to a list
            ``GeneralTracker``; the hand loops a list. Host reads per log point: one (cadence reads the mean of
            the 50 losses in one transfer; the others ``.item()`` the current loss, as their docs show); per
            validation: one (a batch-size weighted mean, ``.item()``ed once; Lightning reduces its ``self.log``
            values itself).

and ``mlp-dataset`` (issue 22): the MLP's plain case from a map-style ``Dataset`` (``ItemDataset``: an item
per ``__getitem__``, no ``__getitems__``), the path most users take. Every loop gets the same ``Dataset``
object: cadence as ``train_data`` (its map-style path, with its default ``item_seeding=True``), the hand loop
and the peers through a ``DataLoader`` with the contract's batch sampler and ``default_collate``; ``hand`` and
``hand-dl`` are then the same hand-written ``DataLoader`` loop.

What is timed: the training call only (``run()`` of the hand/Accelerate/Fabric loops, ``Trainer.fit()`` of
cadence and Lightning), with the objects built before the clock starts (their build time, "setup", is shown
apart). Each run is whole epochs, so no loop stops inside an epoch. The loops run round-robin inside one
process (repeat ``r`` starts at loop ``r mod 6``) after one untimed warm-up run of each; figures are medians,
ratios are ratios of medians, of wall time and of this thread's CPU time (``time.thread_time``, less disturbed
by other processes on a loaded machine); "paired" is the median of each repeat's own ratio, and "steady" the
time per step from the first forward of step 1 to that of the last step (the model's forward stamps
``perf_counter()``), which leaves out each loop's fixed start-up and tear-down. After each run the trained
weights are compared with the hand loop's and the final validation loss is printed: cadence and the hand loop
must agree bitwise (on this setup every loop does).

``--instructions`` also counts the instructions per step of the MLP cases under valgrind's callgrind: a
figure that, unlike time, does not move with what else the machine runs (about 40 minutes).

Memory: each loop trains the plain case of each model in a fresh interpreter (RSS peaks are per process) that
imports only what the loop needs; the peak RSS (``VmHWM``) and the RSS after imports are reported.
Import time: fresh interpreters, alternated, ``import torch`` as the baseline.

    .venv/bin/python benchmarks/peers.py             # the full run (about 8 minutes on 2 idle CPU cores)
    .venv/bin/python benchmarks/peers.py --quick     # smoke run (under a minute on an idle machine)
    .venv/bin/python benchmarks/peers.py --only-instructions    # callgrind instruction counts only
    .venv/bin/python benchmarks/peers.py --steps 1024 --lm-steps 64 --repeats 3 --cases mlp-plain,lm-plain
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import common
import torch
from common import ItemDataset, callgrind, clock, cpu_name, epoch_perm, rotated, since, timed_import
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

SEED = 0
LR, MAX_NORM, LOG_EVERY = 1e-3, 1.0, 50
LOOPS = ("hand", "hand-dl", "cadence", "accel", "fabric", "lightning")
NAMES = {"hand": "hand-written loop (in-memory)", "hand-dl": "hand-written loop (DataLoader)",
         "cadence": "cadence Trainer", "accel": "Accelerate", "fabric": "Lightning Fabric",
         "lightning": "Lightning Trainer"}
PEERS = ("accel", "fabric", "lightning")
GOAL = 1.03  # cadence / hand on the per-step case must be at most this
GOAL_DATASET = 1.05  # cadence / the hand-written DataLoader loop from a map-style Dataset (issue 22)

# perf_counter() at every training forward call (a list append: the same cost in every loop). The time from the
# first forward of optimizer step 1 to the first forward of the last step, over steps - 2, is the steady-state
# time per step: what remains once a loop's fixed start-up and tear-down are left out.
STAMPS: list[float] = []


# ------------------------------------------------------------------------------------------------ models
class MLP(common.MLP):
    """32 -> 32 -> 32 -> 10 (``common.MLP``), the tiny model of the per-step overhead case, stamping its forward."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.training:
            STAMPS.append(time.perf_counter())
        return super().forward(x, y)


class TinyLM(common.TinyLM):
    """The small causal transformer LM (``common.TinyLM``, no dropout, so every loop computes the same thing),
    stamping its forward."""

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.training:
            STAMPS.append(time.perf_counter())
        return super().forward(tokens, targets)


@dataclass(frozen=True)
class Model:
    """A model and its data: ``n`` training items, ``n_val`` validation items, micro-batches of ``batch``."""

    name: str
    batch: int
    n: int
    n_val: int
    items_per_sample: int  # tokens per sequence for the LM (for tokens/s), 1 for the MLP
    unit: str

    @property
    def epoch(self) -> int:
        """Micro-batches per epoch."""
        return self.n // self.batch

    def build(self) -> nn.Module:
        torch.manual_seed(SEED)
        return MLP() if self.name == "mlp" else TinyLM()

    def data(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        x, y = common.make_data(self.name, self.n + self.n_val)
        return (x[:self.n], y[:self.n]), (x[self.n:].contiguous(), y[self.n:].contiguous())


# n is a multiple of batch * 4, so every epoch holds whole optimizer steps with or without grad_accum=4
MODELS = {"mlp": Model("mlp", batch=64, n=4096, n_val=1024, items_per_sample=1, unit="steps/s"),
          "lm": Model("lm", batch=16, n=256, n_val=64, items_per_sample=64, unit="tokens/s")}


@dataclass(frozen=True)
class Case:
    key: str
    model: Model
    micro: int  # micro-batches per run (a multiple of the epoch)
    grad_accum: int = 1
    val_log: bool = False
    dataset: bool = False  # the training data as a map-style Dataset (ItemDataset), not tensors

    @property
    def steps(self) -> int:
        return self.micro // self.grad_accum

    @property
    def epochs(self) -> int:
        return self.micro // self.model.epoch

    @property
    def val_every(self) -> int:
        return max(self.steps // 4, 1)

    def describe(self) -> str:
        bits = [f"{self.model.name}", f"{self.steps} steps", f"{self.micro} micro-batches of {self.model.batch}",
                f"{self.epochs} epochs"]
        if self.grad_accum > 1:
            bits.append(f"grad_accum={self.grad_accum}")
        if self.dataset:
            bits.append("from a map-style Dataset")
        if self.val_log:
            bits.append(f"log every {LOG_EVERY}, validate every {self.val_every} steps ({self.model.n_val} items)")
        return ", ".join(bits)


def make_cases(steps: int, lm_steps: int) -> dict[str, Case]:
    cases = {}
    for model, micro in ((MODELS["mlp"], steps), (MODELS["lm"], lm_steps)):
        micro = max(model.epoch, -(-micro // model.epoch) * model.epoch)  # whole epochs
        cases[f"{model.name}-plain"] = Case(f"{model.name}-plain", model, micro)
        cases[f"{model.name}-accum4"] = Case(f"{model.name}-accum4", model, micro, grad_accum=4)
        cases[f"{model.name}-val+log"] = Case(f"{model.name}-val+log", model, micro, val_log=True)
    mlp = cases["mlp-plain"]
    cases["mlp-dataset"] = replace(mlp, key="mlp-dataset", dataset=True)
    return cases


# ------------------------------------------------------------------------------------------------ data
class ContractBatches(Sampler):
    """A batch sampler yielding the contract's consecutive index slices; it counts epochs itself (the ``e``-th
    iteration that is actually drawn from is epoch ``e``), so no framework's ``set_epoch`` convention matters."""

    def __init__(self, n: int, batch: int, shuffle: bool = True, lists: bool = False) -> None:
        self.n, self.batch, self.shuffle, self.epoch = n, batch, shuffle, 0
        self.lists = lists  # yield lists of ints (for __getitem__ item by item), not index tensors

    def __len__(self) -> int:
        return -(-self.n // self.batch)

    def __iter__(self) -> Iterator[torch.Tensor]:
        perm = epoch_perm(self.n, self.epoch) if self.shuffle else torch.arange(self.n)
        self.epoch += 1
        for i in range(0, self.n, self.batch):
            yield perm[i:i + self.batch].tolist() if self.lists else perm[i:i + self.batch]


class TensorBatches(Dataset):
    """Tensors batched by indexing (``__getitems__``): no per-item ``__getitem__`` and no collation."""

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[i] for t in self.tensors)

    def __getitems__(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t[index] for t in self.tensors)


def as_is(batch: Any) -> Any:
    return batch


def loader(data: tuple[torch.Tensor, torch.Tensor] | ItemDataset, batch: int, shuffle: bool) -> DataLoader:
    """The peers' DataLoader: tensors batched by indexing, or a map-style dataset item by item."""
    if isinstance(data, ItemDataset):
        return DataLoader(data, batch_sampler=ContractBatches(len(data), batch, shuffle, lists=True))
    return DataLoader(TensorBatches(*data), batch_sampler=ContractBatches(len(data[0]), batch, shuffle),
                      collate_fn=as_is)


def memory_batches(data: tuple[torch.Tensor, torch.Tensor], batch: int, epoch: int | None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """In-memory batches of an epoch (``epoch=None``: in order, for validation)."""
    x, y = data
    perm = epoch_perm(len(x), epoch) if epoch is not None else None
    for i in range(0, len(x), batch):
        if perm is None:
            yield x[i:i + batch], y[i:i + batch]
        else:
            idx = perm[i:i + batch]
            yield x[idx], y[idx]


def mean_loss(model: nn.Module, batches: Any) -> float:
    """The batch-size weighted mean loss in eval mode under no_grad, read once; the model is left training."""
    model.eval()
    total, count = None, 0
    with torch.no_grad():
        for x, y in batches:
            loss = model(x, y) * len(x)
            total = loss if total is None else total + loss
            count += len(x)
    model.train()
    return (total / count).item()


# ------------------------------------------------------------------------------------------------ the loops
# Each builder takes (case, model, train, val) and returns (run, records): run() trains (the timed part);
# records is the list the loop logs into (to count what it logged). The builder's own time is "setup".
Data = tuple[torch.Tensor, torch.Tensor]
Built = tuple[Callable[[], None], list]


def build_hand(case: Case, model: nn.Module, train: Data, val: Data, use_loader: bool = False) -> Built:
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    params = list(model.parameters())
    b, ga = case.model.batch, case.grad_accum
    records: list = []
    use_loader = use_loader or case.dataset  # a Dataset is read through a DataLoader, by hand too
    train_dl = loader(train, b, shuffle=True) if use_loader else None
    val_dl = loader(val, b, shuffle=False) if use_loader else None

    def run() -> None:
        model.train()
        step = 0
        for epoch in range(case.epochs):
            batches = train_dl if use_loader else memory_batches(train, b, epoch)
            for i, (x, y) in enumerate(batches):
                loss = model(x, y)
                (loss / ga if ga > 1 else loss).backward()
                if (i + 1) % ga:
                    continue
                nn.utils.clip_grad_norm_(params, MAX_NORM)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                if case.val_log and step % LOG_EVERY == 0:
                    records.append({"step": step, "train/loss": loss.item()})
                if case.val_log and step % case.val_every == 0:
                    vb = val_dl if use_loader else memory_batches(val, b, None)
                    records.append({"step": step, "val/loss": mean_loss(model, vb)})
        records.append({"step": step, "train/loss": loss.item()})  # the final read every loop makes

    return run, records


def build_cadence(case: Case, model: nn.Module, train: Data, val: Data) -> Built:
    from cadence import Trainer

    trainer = Trainer(model, train, val_data=val if case.val_log else None, batch_size=case.model.batch,
                      grad_accum=case.grad_accum, max_steps=case.steps, optimizer="adamw", lr=LR,
                      weight_decay=0.0, max_grad_norm=MAX_NORM, log_every=LOG_EVERY if case.val_log else case.steps,
                      val_every=case.val_every if case.val_log else None, progress=False, device="cpu", seed=SEED)

    def run() -> None:
        trainer.fit()
        assert trainer.step == case.steps, (trainer.step, case.steps)

    return run, trainer.history


def build_accel(case: Case, model: nn.Module, train: Data, val: Data) -> Built:
    from accelerate import Accelerator

    quiet()
    records: list = []
    tracker = list_tracker(records) if case.val_log else None
    acc = Accelerator(cpu=True, gradient_accumulation_steps=case.grad_accum,
                      log_with=[tracker] if tracker is not None else None)
    if case.val_log:
        acc.init_trackers("peers")
    b = case.model.batch
    model_p, opt, train_dl, val_dl = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0),
                                                 loader(train, b, True), loader(val, b, False))

    def run() -> None:
        model_p.train()
        step = 0
        for _ in range(case.epochs):
            for x, y in train_dl:
                with acc.accumulate(model_p):
                    loss = model_p(x, y)
                    acc.backward(loss)
                    if acc.sync_gradients:
                        acc.clip_grad_norm_(model_p.parameters(), MAX_NORM)
                    opt.step()
                    opt.zero_grad()
                if not acc.sync_gradients:
                    continue
                step += 1
                if case.val_log and step % LOG_EVERY == 0:
                    acc.log({"train/loss": loss.item()}, step=step)
                if case.val_log and step % case.val_every == 0:
                    acc.log({"val/loss": mean_loss(model_p, val_dl)}, step=step)
        records.append({"step": step, "train/loss": loss.item()})
        acc.end_training()

    return run, records


def build_fabric(case: Case, model: nn.Module, train: Data, val: Data) -> Built:
    from lightning.fabric import Fabric

    quiet()
    records: list = []
    fabric = Fabric(accelerator="cpu", devices=1, loggers=[fabric_logger(records)] if case.val_log else None)
    fabric.launch()
    model_f, opt = fabric.setup(model, torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0))
    b, ga = case.model.batch, case.grad_accum
    train_dl, val_dl = fabric.setup_dataloaders(loader(train, b, True), loader(val, b, False))

    def run() -> None:
        model_f.train()
        step = 0
        for _ in range(case.epochs):
            for i, (x, y) in enumerate(train_dl):
                accumulating = (i + 1) % ga != 0
                with fabric.no_backward_sync(model_f, enabled=accumulating):
                    loss = model_f(x, y)
                    fabric.backward(loss / ga if ga > 1 else loss)
                if accumulating:
                    continue
                fabric.clip_gradients(model_f, opt, max_norm=MAX_NORM)
                opt.step()
                opt.zero_grad()
                step += 1
                if case.val_log and step % LOG_EVERY == 0:
                    fabric.log("train/loss", loss, step=step)  # .item() inside
                if case.val_log and step % case.val_every == 0:
                    fabric.log("val/loss", mean_loss(model_f, val_dl), step=step)
        records.append({"step": step, "train/loss": loss.item()})

    return run, records


def build_lightning(case: Case, model: nn.Module, train: Data, val: Data) -> Built:
    import lightning as L

    quiet()
    records: list = []
    module = lightning_module(L)(model, case.val_log)
    root = tempfile.mkdtemp(prefix="cadence-peers-")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=case.steps, gradient_clip_val=MAX_NORM,
                        accumulate_grad_batches=case.grad_accum,
                        logger=lightning_logger(records) if case.val_log else False, log_every_n_steps=LOG_EVERY,
                        val_check_interval=case.val_every if case.val_log else None,
                        check_val_every_n_epoch=None if case.val_log else 1, num_sanity_val_steps=0,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root)
    b = case.model.batch
    train_dl = loader(train, b, True)
    val_dl = loader(val, b, False) if case.val_log else None

    def run() -> None:
        trainer.fit(module, train_dataloaders=train_dl, val_dataloaders=val_dl)
        assert trainer.global_step == case.steps, (trainer.global_step, case.steps)
        records.append({"step": trainer.global_step, "train/loss": module.last_loss.item()})

    return run, records


BUILDERS: dict[str, Callable[[Case, nn.Module, Data, Data], Built]] = {
    "hand": build_hand,
    "hand-dl": lambda *a: build_hand(*a, use_loader=True),
    "cadence": build_cadence,
    "accel": build_accel,
    "fabric": build_fabric,
    "lightning": build_lightning,
}


# Framework classes are defined on first use, so that a loop's process imports only its own framework.
_CLASSES: dict[str, Any] = {}


def lightning_module(L: Any) -> type:
    if "module" not in _CLASSES:
        class Lit(L.LightningModule):
            def __init__(self, model: nn.Module, val_log: bool) -> None:
                super().__init__()
                self.model, self.val_log, self.last_loss = model, val_log, None

            def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
                loss = self.model(*batch)
                if self.val_log:
                    self.log("train/loss", loss)
                self.last_loss = loss.detach()
                return loss

            def validation_step(self, batch: Any, batch_idx: int) -> None:
                self.log("val/loss", self.model(*batch), batch_size=len(batch[0]))

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=0.0)

        _CLASSES["module"] = Lit
    return _CLASSES["module"]


def lightning_logger(records: list) -> Any:
    from lightning.pytorch.loggers import Logger

    return list_logger(Logger, records)


def fabric_logger(records: list) -> Any:
    from lightning.fabric.loggers import Logger

    return list_logger(Logger, records)


def list_logger(Logger: type, records: list) -> Any:  # noqa: N803 (Lightning's or Fabric's Logger class)
    class ListLogger(Logger):
        name, version = "list", 0

        def log_metrics(self, metrics: dict, step: int | None = None) -> None:
            records.append({"step": step, **metrics})

        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            pass

    return ListLogger()


def list_tracker(records: list) -> Any:
    from accelerate.tracking import GeneralTracker

    class ListTracker(GeneralTracker):
        name, requires_logging_directory = "list", False

        @property
        def tracker(self) -> list:
            return records

        def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
            records.append({"step": step, **values})

    return ListTracker()


def quiet() -> None:
    """Silence the peers' start-up banners and advice about workers (not errors)."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning",
                 "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*num_workers.*")
    warnings.filterwarnings("ignore", message=".*val_check_interval.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*validation_step.*but have no.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")


# ------------------------------------------------------------------------------------------------ one run
@dataclass
class Result:
    wall: float
    cpu: float
    setup: float
    steady: float  # seconds per optimizer step between the first forward of step 1 and of the last step
    weights: torch.Tensor
    val_loss: float
    records: int
    val_records: int


def train_once(loop: str, case: Case, init: nn.Module, train: Data, val: Data) -> Result:
    model = copy.deepcopy(init)
    t0 = time.perf_counter()
    run, records = BUILDERS[loop](case, model, train, val)
    setup = time.perf_counter() - t0
    STAMPS.clear()
    start = clock()
    run()
    wall, cpu = since(start)
    if len(STAMPS) != case.micro:
        raise SystemExit(f"{loop} ran {len(STAMPS)} training forwards, not {case.micro}")
    ga, steps = case.grad_accum, case.steps
    steady = (STAMPS[(steps - 1) * ga] - STAMPS[ga]) / (steps - 2) if steps > 2 else wall / steps
    if torch.get_num_threads() != 1:
        raise SystemExit(f"{loop} changed torch's thread count to {torch.get_num_threads()}")
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    vals = sum(1 for r in records if r.get("split") == "val" or any(str(k).startswith("val/") for k in r))
    return Result(wall, cpu, setup, steady, weights, mean_loss(model, memory_batches(val, case.model.batch, None)),
                  len(records), vals)


def bench_case(case: Case, loops: list[str], repeats: int, warmup: bool = True) -> dict[str, list[Result]]:
    init = case.model.build()
    train, val = case.model.data()
    if case.dataset:
        train = ItemDataset(*train)  # one object for every loop
    warm = replace(case, micro=case.model.epoch)
    for loop in loops if warmup else ():  # untimed warm-up: lazy imports, allocator, caches
        train_once(loop, warm, init, train, val)
    results: dict[str, list[Result]] = {k: [] for k in loops}
    for r in range(repeats):
        for loop in rotated(loops, r):
            results[loop].append(train_once(loop, case, init, train, val))
        print(f"    repeat {r + 1}/{repeats} wall s: "
              + "  ".join(f"{k}={results[k][-1].wall:.2f}" for k in loops), flush=True)
    return results


def report_case(case: Case, results: dict[str, list[Result]]) -> dict[str, Any]:
    med = {k: statistics.median(r.wall for r in v) for k, v in results.items()}
    cmed = {k: statistics.median(r.cpu for r in v) for k, v in results.items()}
    smed = {k: statistics.median(r.steady for r in v) for k, v in results.items()}
    ref = results["hand"][0]
    per_run = case.micro * case.model.batch * case.model.items_per_sample if case.model.name == "lm" else case.steps
    lines = [f"| loop | median s | min-max s | {case.model.unit} | vs hand | vs hand, CPU time | paired vs hand | "
             "steady ms/step | steady vs hand | setup ms | final val loss | weights vs hand | records (val) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    summary: dict[str, Any] = {}
    for k, v in results.items():
        walls = [r.wall for r in v]
        diff = max((r.weights - ref.weights).abs().max().item() for r in v)
        same = all(torch.equal(r.weights, ref.weights) for r in v)
        agree = "bitwise" if same else f"max abs diff {diff:.1e}"
        setup = statistics.median(r.setup for r in v) * 1e3
        # each repeat's own ratio (the loops of one repeat ran within seconds of each other), then the median
        paired = statistics.median(r.wall / h.wall for r, h in zip(v, results["hand"]))
        best = min(walls) / min(r.wall for r in results["hand"])
        lines.append(f"| {NAMES[k]} | {med[k]:.3f} | {min(walls):.2f}-{max(walls):.2f} | {per_run / med[k]:,.0f} | "
                     f"{med[k] / med['hand']:.3f}x | {cmed[k] / cmed['hand']:.3f}x | {paired:.3f}x | "
                     f"{smed[k] * 1e3:.3f} | {smed[k] / smed['hand']:.3f}x | {setup:.0f} | {v[0].val_loss:.6f} | "
                     f"{agree} | {v[0].records} ({v[0].val_records}) |")
        summary[k] = {"median_s": med[k], "cpu_median_s": cmed[k], "steady_s": smed[k],
                      "ratio": med[k] / med["hand"], "cpu_ratio": cmed[k] / cmed["hand"],
                      "steady_ratio": smed[k] / smed["hand"], "paired_ratio": paired, "best_ratio": best,
                      "bitwise": same,
                      "max_abs_diff": diff, "val_loss": v[0].val_loss, "walls": walls,
                      "cpus": [r.cpu for r in v], "steadies": [r.steady for r in v]}
    print("\n".join(lines))
    return {"lines": lines, "summary": summary}


# ------------------------------------------------------------------------------------------------ memory
def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def child_memory(loop: str, model_name: str, micro: int, n: int) -> None:
    """In a fresh interpreter: import what ``loop`` needs, train the plain case, print the RSS figures."""
    torch.set_num_threads(1)
    import_for(loop)
    after_import = rss_kib("VmRSS")
    MODELS[model_name] = replace(MODELS[model_name], n=n)
    case = make_cases(micro, micro)[f"{model_name}-plain"]
    init = case.model.build()
    train, val = case.model.data()
    train_once(loop, case, init, train, val)
    print(json.dumps({"after_import_kib": after_import, "hwm_kib": rss_kib("VmHWM"),
                      "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def bench_memory(loops: list[str], micro: dict[str, int], repeats: int) -> list[str]:
    """Each loop's plain case in a fresh interpreter; ``micro`` maps a model name to its micro-batches."""
    def child(job: tuple[str, str]) -> dict[str, int]:
        model_name, loop = job
        out = subprocess.run([sys.executable, __file__, "--child-memory", loop, model_name, str(micro[model_name]),
                              str(MODELS[model_name].n)], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"memory child {loop} {model_name} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    jobs = [(m, loop) for r in range(repeats) for m in micro
            for loop in rotated(loops, r)]
    figures: dict[tuple[str, str], list[dict[str, int]]] = {}
    # a process's peak RSS does not depend on what runs beside it: two children at a time
    with ThreadPoolExecutor(max_workers=2) as pool:
        for job, fig in zip(jobs, pool.map(child, jobs)):
            figures.setdefault(job, []).append(fig)
    lines = ["| model | loop | RSS after imports MiB | peak RSS (VmHWM) MiB | peak vs hand MiB | peak vs hand | "
             "training growth MiB |", "|---|---|---:|---:|---:|---:|---:|"]
    for model_name in micro:
        base = statistics.median(f["hwm_kib"] for f in figures[(model_name, "hand")])
        for loop in loops:
            fs = figures[(model_name, loop)]
            imp = statistics.median(f["after_import_kib"] for f in fs) / 1024
            hwm = statistics.median(f["hwm_kib"] for f in fs)
            lines.append(f"| {model_name} | {NAMES[loop]} | {imp:.0f} | {hwm / 1024:.0f} | "
                         f"{(hwm - base) / 1024:+.0f} | {hwm / base:.2f}x | {hwm / 1024 - imp:.0f} |")
    print("\n".join(lines))
    return lines


# ------------------------------------------------------------------------------------------------ instructions
# Instructions executed, counted by valgrind's callgrind (``common.callgrind``). Each loop runs in its own process
# under callgrind, which dumps its counters whenever getloadavg() is called (nothing else here calls it); each MLP
# case trains a warm-up epoch, then 1 and 3 epochs, each run between two dumps. Per step = (instructions of the
# 3-epoch run - those of the 1-epoch run) / (its extra steps): the loop's fixed start-up and tear-down cancel out.
INSTRUCTION_CASES = ("mlp-plain", "mlp-accum4", "mlp-val+log")
INSTRUCTION_RUNS = (1, 1, 3)  # epochs: warm-up, short, long


def mark() -> None:
    os.getloadavg()  # callgrind --dump-before=getloadavg


def import_for(loop: str) -> None:
    if loop == "cadence":
        import cadence  # noqa: F401
    elif loop == "accel":
        import accelerate  # noqa: F401
    elif loop in ("fabric", "lightning"):
        import lightning  # noqa: F401
    quiet()


def child_instructions(loop: str) -> None:
    torch.set_num_threads(1)
    import_for(loop)
    cases = make_cases(64, 16)
    for key in INSTRUCTION_CASES:
        case = cases[key]
        init = case.model.build()
        train, val = case.model.data()
        for epochs in INSTRUCTION_RUNS:
            run, _ = BUILDERS[loop](replace(case, micro=epochs * case.model.epoch), copy.deepcopy(init), train, val)
            mark()
            run()
            mark()


def bench_instructions(loops: list[str]) -> list[str]:
    folder = tempfile.mkdtemp(prefix="cadence-peers-callgrind-")

    def child(loop: str) -> list[int]:
        code, output, totals = callgrind([sys.executable, __file__, "--child-instructions", loop], "getloadavg",
                                         Path(folder) / f"{loop}.out")
        expected = 2 * len(INSTRUCTION_CASES) * len(INSTRUCTION_RUNS)
        if code or len(totals) != expected:
            raise SystemExit(f"callgrind {loop}: exit {code}, {len(totals)} dumps (expected {expected})\n"
                             f"{output[-3000:]}")
        return totals[1::2]  # the dumps at the end of each run

    with ThreadPoolExecutor(max_workers=2) as pool:
        counts = dict(zip(loops, pool.map(child, loops)))
    cases = make_cases(64, 16)
    lines = ["| case | loop | instructions per step | vs hand | instructions of the 3-epoch run | vs hand |",
             "|---|---|---:|---:|---:|---:|"]
    runs = len(INSTRUCTION_RUNS)
    for c, key in enumerate(INSTRUCTION_CASES):
        steps = [e * cases[key].model.epoch // cases[key].grad_accum for e in INSTRUCTION_RUNS]
        per_step = {k: (v[c * runs + 2] - v[c * runs + 1]) / (steps[2] - steps[1]) for k, v in counts.items()}
        whole = {k: v[c * runs + 2] for k, v in counts.items()}
        for loop in loops:
            lines.append(f"| {key} | {NAMES[loop]} | {per_step[loop] / 1e6:.3f} M | "
                         f"{per_step[loop] / per_step['hand']:.3f}x | {whole[loop] / 1e6:,.0f} M | "
                         f"{whole[loop] / whole['hand']:.3f}x |")
    print("\n".join(lines))
    return lines


# ------------------------------------------------------------------------------------------------ imports
IMPORTS = {
    "torch": "import torch",
    "cadence": "import torch; import cadence",
    "accelerate": "import torch; from accelerate import Accelerator",
    "lightning_fabric (standalone Fabric)": "import torch; from lightning_fabric import Fabric",
    "lightning (Trainer + Fabric)": "import torch; import lightning",
}


def bench_imports(repeats: int, names: list[str] | None = None) -> list[str]:
    """Alternated rounds; the file cache is already warm (main() imported every package before)."""
    names = names or list(IMPORTS)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in rotated(names, r):
            w, c = timed_import(IMPORTS[name])
            wall[name].append(w)
            cpu[name].append(c)
    bw, bc = statistics.median(wall["torch"]), statistics.median(cpu["torch"])
    lines = ["| import | median wall s | over torch s | median CPU s | over torch, CPU s |",
             "|---|---:|---:|---:|---:|"]
    for name in names:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        lines.append(f"| `{IMPORTS[name]}` | {w:.2f} | {w - bw:+.2f} | {c:.2f} | {c - bc:+.2f} |")
    print("\n".join(lines))
    return lines


# ------------------------------------------------------------------------------------------------ main
def versions() -> list[str]:
    import cadence

    def version(name: str) -> str:  # a peer not installed can still be left out with --loops
        try:
            return __import__(name).__version__
        except ImportError:
            return "not installed"

    return [f"date: {datetime.date.today().isoformat()}",
            f"machine: {cpu_name()}, os.cpu_count()={os.cpu_count()}, no GPU used; torch threads=1; "
            f"load average at start {os.getloadavg()[0]:.1f}",
            f"python {platform.python_version()}, torch {torch.__version__}, accelerate {version('accelerate')}, "
            f"lightning {version('lightning')}, cadence {getattr(cadence, '__version__', '0.1.0')}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=256, help="MLP micro-batches per run, rounded up to whole epochs "
                    "of 64 (default 256)")
    ap.add_argument("--lm-steps", type=int, default=32, help="LM micro-batches per run, rounded up to whole epochs "
                    "of 16 (default 32)")
    ap.add_argument("--repeats", type=int, default=9, help="timed runs of each loop per MLP case (default 9)")
    ap.add_argument("--lm-repeats", type=int, default=3, help="timed runs of each loop per LM case (default 3)")
    ap.add_argument("--quick", action="store_true", help="smoke run (under a minute on an idle machine): 64 MLP "
                    "steps, an LM epoch of 4 micro-batches, 1 repeat, no warm-up, memory of the hand loop and cadence "
                    "on the MLP, one round of the torch and cadence imports")
    ap.add_argument("--cases", default="all", help="comma-separated case keys (mlp-plain, mlp-accum4, mlp-val+log, "
                    "mlp-dataset, lm-plain, lm-accum4, lm-val+log)")
    ap.add_argument("--loops", default=",".join(LOOPS), help=f"comma-separated loops ({', '.join(LOOPS)}); "
                    "hand is always run")
    ap.add_argument("--memory-repeats", type=int, default=3, help="fresh processes per loop and model (default 3)")
    ap.add_argument("--import-repeats", type=int, default=3, help="alternated rounds of imports (default 3)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-imports", action="store_true")
    ap.add_argument("--instructions", action="store_true", help="also count the instructions per step of the MLP "
                    "cases under valgrind's callgrind (load-independent; about 40 minutes; needs valgrind)")
    ap.add_argument("--only-instructions", action="store_true", help="count instructions, skip everything else")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--child-instructions", metavar="LOOP", help=argparse.SUPPRESS)
    ap.add_argument("--child-memory", nargs=4, metavar=("LOOP", "MODEL", "MICRO", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_instructions:
        child_instructions(args.child_instructions)
        return 0
    if args.only_instructions:
        args.instructions, args.skip_memory, args.skip_imports, args.cases = True, True, True, ""
    if args.child_memory:
        loop, model_name, micro, n = args.child_memory
        child_memory(loop, model_name, int(micro), int(n))
        return 0
    if args.quick:
        args.steps, args.lm_steps, args.repeats, args.lm_repeats, args.import_repeats = 64, 8, 1, 1, 1
        args.memory_repeats = 1
        MODELS["lm"] = replace(MODELS["lm"], n=64, n_val=32)

    torch.set_num_threads(1)
    quiet()
    loops = [k.strip() for k in args.loops.split(",") if k.strip()]
    loops = ["hand"] + [k for k in loops if k != "hand"]
    unknown = [k for k in loops if k not in BUILDERS]
    cases = make_cases(args.steps, args.lm_steps)
    chosen = list(cases) if args.cases == "all" else [k.strip() for k in args.cases.split(",") if k.strip()]
    unknown += [k for k in chosen if k not in cases]
    if unknown:
        raise SystemExit(f"unknown loops or cases: {unknown}; loops: {list(BUILDERS)}, cases: {list(cases)}")
    print("cadence against its peers (issue 10)")
    info = versions()
    for line in info:
        print("  " + line)
    print(f"  command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}\n", flush=True)

    out: dict[str, Any] = {"versions": info, "argv": sys.argv, "cases": {}}
    start = time.perf_counter()
    for key in chosen:
        case = cases[key]
        repeats = args.lm_repeats if case.model.name == "lm" else args.repeats
        print(f"## {key}: {case.describe()}; {repeats} repeats", flush=True)
        results = bench_case(case, loops, repeats, warmup=not args.quick)
        out["cases"][key] = report_case(case, results)
        print(flush=True)

    for key, goal in (("mlp-plain", GOAL), ("mlp-dataset", GOAL_DATASET)):
        plain = out["cases"].get(key, {}).get("summary")
        if not plain or "cadence" not in plain:
            continue
        c = plain["cadence"]
        peers = [k for k in PEERS if k in plain]
        for label, field in (("wall", "ratio"), ("CPU time", "cpu_ratio"), ("paired", "paired_ratio"),
                             ("fastest runs", "best_ratio"), ("steady state", "steady_ratio")):
            below = all(c[field] < plain[k][field] for k in peers)
            print(f"per-step overhead ({key}, {label}): cadence/hand = {c[field]:.3f}x; goal <= {goal}: "
                  f"{'met' if c[field] <= goal else 'NOT met'}; below every peer: {'yes' if below else 'NO'} ("
                  + ", ".join(f"{NAMES[k]} {plain[k][field]:.3f}x" for k in peers) + ")")
    print(f"timing cases took {time.perf_counter() - start:.0f} s\n", flush=True)

    if args.instructions:
        print("## instructions per step (callgrind, one process per loop)", flush=True)
        out["instructions"] = bench_instructions(loops)
        print(flush=True)

    if not args.skip_memory:
        print("## peak memory (a fresh process per loop and model, plain case)", flush=True)
        micro = {"mlp": cases["mlp-plain"].micro}
        if not args.quick:
            micro["lm"] = cases["lm-plain"].micro
        out["memory"] = bench_memory(["hand", "cadence"] if args.quick else loops, micro, args.memory_repeats)
        print(flush=True)
    if not args.skip_imports:
        print(f"## import time (fresh interpreters, {args.import_repeats} alternated rounds)", flush=True)
        out["imports"] = bench_imports(args.import_repeats, names=["torch", "cadence"] if args.quick else None)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
