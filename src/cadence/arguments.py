"""Checks on the ``Trainer``'s arguments, run before anything is built or trained.

Each failing check raises :class:`~cadence.errors.ConfigError` naming the argument, the value and the fix.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import bad


def positive_int(name: str, value: Any, fix: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise bad(name, value, fix)


def positive_float(name: str, value: Any, fix: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise bad(name, value, fix)


def check_basic(a: dict[str, Any]) -> None:
    """Checks that need nothing but the argument values themselves."""
    positive_int("batch_size", a["batch_size"], "use a positive number of items per micro-batch, e.g. 32.")
    positive_int("grad_accum", a["grad_accum"], "use 1 (no accumulation) or more micro-batches per step.")
    positive_int("max_steps", a["max_steps"], "use a positive number of optimizer steps, or None.",
                 allow_none=True)
    positive_int("max_epochs", a["max_epochs"], "use a positive number of epochs, or None.", allow_none=True)
    if a["max_steps"] is None and a["max_epochs"] is None and not a.get("stages"):
        raise bad("max_steps", None, "the run needs a length: set max_steps (optimizer steps) or max_epochs.")
    positive_float("lr", a["lr"], "use a positive learning rate, e.g. 1e-3.")
    if not isinstance(a["weight_decay"], (int, float)) or a["weight_decay"] < 0:
        raise bad("weight_decay", a["weight_decay"], "use 0 (none) or a positive decay, e.g. 0.01.")
    if not isinstance(a["warmup_steps"], int) or a["warmup_steps"] < 0:
        raise bad("warmup_steps", a["warmup_steps"], "use 0 (no warm-up) or a positive number of steps.")
    if a["warmup_start_lr"] < 0:
        raise bad("warmup_start_lr", a["warmup_start_lr"], "use a rate >= 0 for the warm-up to start from.")
    positive_float("max_grad_norm", a["max_grad_norm"], "use a positive norm, e.g. 1.0, or None to not clip.",
                   allow_none=True)
    positive_int("log_every", a["log_every"], "use a positive number of steps between log points.")
    positive_int("val_every", a["val_every"], "use a positive number of steps, or None for each epoch end.",
                 allow_none=True)
    positive_int("checkpoint_every", a["checkpoint_every"], "use a positive number of steps, or None.",
                 allow_none=True)
    if not isinstance(a["num_workers"], int) or a["num_workers"] < 0:
        raise bad("num_workers", a["num_workers"], "use 0 (load in this process) or a positive worker count.")
    if a["valid_frac"] is not None and a["val_data"] is not None:
        raise bad("valid_frac", a["valid_frac"], "val_data is given too; pass one or the other.")
    if a["valid_frac"] is not None and not 0.0 < a["valid_frac"] < 1.0:
        raise bad("valid_frac", a["valid_frac"], "use a fraction strictly between 0 and 1, e.g. 0.1.")
    if a["split_by"] is not None and a["valid_frac"] is None:
        raise bad("split_by", a["split_by"], "it splits off validation data by group; set valid_frac too.")
    if a["val_every"] is not None and a["val_data"] is None and a["valid_frac"] is None:
        raise bad("val_every", a["val_every"], "there is no validation data; pass val_data or valid_frac, "
                  "or leave val_every as None.")
    if a.get("early_stopping") and a["val_data"] is None and a["valid_frac"] is None:
        raise bad("early_stopping", list(a["early_stopping"]), "it watches validation metrics, and there is no "
                  "validation data; pass val_data or valid_frac.")
    if a["max_steps"] is not None and a["warmup_steps"] > a["max_steps"]:
        raise bad("warmup_steps", a["warmup_steps"],
                  f"it is longer than max_steps={a['max_steps']}; lower warmup_steps or raise max_steps.")
    if a["on_nonfinite"] not in ("raise", "skip"):
        raise bad("on_nonfinite", a["on_nonfinite"], 'use "raise" (stop at a non-finite loss) or "skip".')
    positive_int("max_nonfinite", a["max_nonfinite"], "use a positive number of non-finite steps in a row.")
    if a["validate_on"] not in ("model", "ema", "both"):
        raise bad("validate_on", a["validate_on"], 'use "model", "ema" or "both".')
    if a["validate_on"] != "model" and a["ema"] is None:
        raise bad("validate_on", a["validate_on"], "there is no EMA to validate; pass ema=EMA(...).")
    if a["stop_when"] not in ("any", "all"):
        raise bad("stop_when", a["stop_when"], 'use "any" (the first stopper that fires) or "all".')
    if any(a[k] for k in ("checkpoint_every", "keep_last", "keep_best", "async_checkpoint", "resume")) \
            and a["run_dir"] is None:
        raise bad("run_dir", None, "checkpoints and resuming need a run folder; pass run_dir=... (--run-dir).")
    keep_best = a["keep_best"]
    if keep_best is not None and (len(keep_best) != 2 or keep_best[1] not in ("min", "max")):
        raise bad("keep_best", keep_best, 'use (metric, "min") or (metric, "max"), e.g. ("val/loss", "min").')
    positive_int("keep_last", a["keep_last"], "use a positive number of checkpoints to keep, or None for all.",
                 allow_none=True)
    if a["ema"] is not None and not hasattr(a["ema"], "attach"):
        raise bad("ema", a["ema"], "pass cadence.EMA(beta=...).")
    if isinstance(a["inputs"], str):
        raise bad("inputs", a["inputs"], f"give a list of field names, e.g. [{a['inputs']!r}].")
    if not isinstance(a["model"], nn.Module):
        raise bad("model", type(a["model"]).__name__, "pass a torch.nn.Module whose forward returns the loss.")
    if a["stages"] and isinstance(a["optimizer"], torch.optim.Optimizer):
        raise bad("optimizer", type(a["optimizer"]).__name__, "stages rebuild the optimizer for each stage; pass "
                  "its name or a callable param_groups -> Optimizer instead of an instance.")
    if a["profile"] is not None and a["run_dir"] is None:
        raise bad("profile", a["profile"], "the trace is written into the run folder; pass run_dir=... too.")


def check_strategy(a: dict[str, Any], strategy: str) -> None:
    """Features that the chosen distributed strategy cannot do yet."""
    if strategy != "fsdp":
        return
    if a["stages"]:
        raise bad("stages", "with strategy='fsdp'", "FSDP shards the parameters once; use strategy='ddp' "
                  "for staged training.")
    if a["ema"] is not None:
        raise bad("ema", a["ema"], "an EMA of FSDP-sharded weights is not supported yet; use strategy='ddp'.")
