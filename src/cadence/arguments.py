"""Checks on the ``Trainer``'s arguments, run before anything is built or trained.

Each failing check raises :class:`~cadence.errors.ConfigError` naming the argument, the value and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import bad
from .optim import check_options
from .schedule import check_warmup
from .weights import unwrap_compiled


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
    check_types(a)
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
    check_warmup(a["warmup_steps"], a["max_steps"])
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
    if a["on_nonfinite"] not in ("raise", "skip"):
        raise bad("on_nonfinite", a["on_nonfinite"], 'use "raise" (stop at a non-finite loss) or "skip".')
    positive_int("max_nonfinite", a["max_nonfinite"], "use a positive number of non-finite steps in a row.")
    check_validation(a)
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
    check_plateau_and_eval(a)
    check_calls(a)
    check_data(a)
    check_compile(a)
    check_seeds(a)
    check_pairs(a)


SEEDS = (-(2**63), 2**63)  # what torch.manual_seed and torch.Generator take as a signed 64-bit integer


def check_seeds(a: dict[str, Any]) -> None:
    """``seed`` and ``split_seed`` are whole numbers torch can seed a generator with."""
    for name in ("seed", "split_seed"):
        value = a.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not SEEDS[0] <= value < SEEDS[1]:
            raise bad(name, value, "use a whole number that fits in 64 bits (between -2**63 and 2**63 - 1), "
                      "e.g. 0.")


def check_pairs(a: dict[str, Any]) -> None:
    """Arguments that contradict each other, or one that another makes meaningless (it would be silently
    ignored): each message names both."""
    schedule, lr, min_lr = a["schedule"], a["lr"], a["min_lr"]
    named = repr(schedule) if isinstance(schedule, str) else "a callable"
    if isinstance(min_lr, (int, float)) and min_lr > lr and schedule in ("linear", "cosine"):
        raise bad("min_lr", min_lr, f"it is above lr={lr!r}, so schedule={schedule!r} would raise the rate "
                  "instead of decaying it; use a min_lr below lr.")
    if tuple(a["milestones"]) and schedule != "multistep":
        raise bad("milestones", list(a["milestones"]), f'they apply to schedule="multistep", and schedule is '
                  f"{named}; drop milestones or use schedule=\"multistep\".")
    if a["gamma"] != 0.1 and schedule not in ("multistep", "exponential"):
        raise bad("gamma", a["gamma"], f'it is the factor of "multistep" and "exponential", and schedule is {named}; '
                  "drop gamma or choose one of those schedules.")
    if a["warmup_start_lr"] and not a["warmup_steps"]:
        raise bad("warmup_start_lr", a["warmup_start_lr"], "it is where the warm-up starts, and warmup_steps=0 "
                  "(no warm-up); set warmup_steps too, or drop warmup_start_lr.")
    if isinstance(lr, (int, float)) and a["warmup_start_lr"] > lr:
        raise bad("warmup_start_lr", a["warmup_start_lr"], f"it is above lr={lr!r}: the warm-up rises from it to "
                  "lr; use a start below lr.")
    names = a.get("part_names")
    if names is not None and "loss" in names:
        raise bad("part_names", list(names), "'loss' is the total loss's own name (train/loss, val/loss); give "
                  "the part another name.")
    if a["resume"] is not None and a["overwrite"]:
        raise bad("overwrite", True, f"resume={str(a['resume'])!r} continues the run in run_dir, and overwrite "
                  "would clear it first; pass one of them (--resume or --overwrite).")
    if a["overwrite"] and a["run_dir"] is None:
        raise bad("overwrite", True, "there is no run folder to overwrite; pass run_dir=... (--run-dir) or drop "
                  "overwrite.")
    if a["split_seed"] != 0 and a["valid_frac"] is None:
        raise bad("split_seed", a["split_seed"], "it seeds the split of valid_frac, and valid_frac is None; set "
                  "valid_frac too, or drop split_seed.")
    if a["max_nonfinite"] != 10 and a["on_nonfinite"] == "raise":
        raise bad("max_nonfinite", a["max_nonfinite"], 'it counts skipped steps of on_nonfinite="skip", and '
                  'on_nonfinite="raise" stops at the first; set on_nonfinite="skip" too, or drop max_nonfinite.')
    if a["inputs"] and a.get("forward") is not None:
        raise bad("inputs", list(a["inputs"]), "forward=callable(model, batch) makes the call itself, so the "
                  "field names are not used; name the fields inside it, or drop forward.")
    profile, max_steps = a["profile"], a["max_steps"]
    if profile is not None and max_steps is not None and len(profile) == 2 and max_steps <= profile[0] < profile[1]:
        raise bad("profile", tuple(profile), f"the run ends at max_steps={max_steps}, before the traced steps "
                  "start; trace earlier steps.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def check_types(a: dict[str, Any]) -> None:
    """Values of the wrong kind, named before any other check reads them (no TypeError from deep inside)."""
    from .callbacks import EVENTS

    for key in ("drop_last", "item_seeding", "shuffle", "overwrite", "progress", "async_checkpoint", "val_mean",
                "new_global_batch"):
        if key in a and not isinstance(a[key], bool):
            raise bad(key, a[key], "use true or false.")
    index = a.get("loss_index")
    if index is not None and (not isinstance(index, int) or isinstance(index, bool)):
        raise bad("loss_index", index, "use the position of the loss in the tuple the model returns (0, 1, ... or "
                  "-1 for the last), e.g. 1 for (logits, loss); or None.")
    for key, fix in (("gamma", "use a factor >= 0, e.g. 0.1."), ("min_lr", "use a rate >= 0."),
                     ("warmup_start_lr", "use a rate >= 0 for the warm-up to start from.")):
        if not _is_number(a[key]) or a[key] < 0:
            raise bad(key, a[key], fix)
    if not _is_list(a["milestones"]) or not all(isinstance(m, int) and not isinstance(m, bool)
                                                for m in a["milestones"]):
        raise bad("milestones", a["milestones"], "give a list of step (or epoch) numbers, e.g. [300, 500].")
    for key, form in (("collate_fn", "a callable list of items -> batch"), ("forward", "a callable(model, batch)")):
        if a[key] is not None and not callable(a[key]):
            raise bad(key, a[key], f"give {form}, or None.")
    for key in ("run_dir", "resume"):
        if a[key] is not None and not isinstance(a[key], (str, os.PathLike)):
            raise bad(key, a[key], "give a folder path (a string or a pathlib.Path), or None.")
    val = a["val_data"]
    if val is not None and not isinstance(val, (Iterable, Mapping)) and not hasattr(val, "__getitem__"):
        raise bad("val_data", type(val).__name__, "pass tensors, a TensorDataset, a map-style Dataset, a "
                  "DataLoader, an iterable of batches, or {name: data}.")
    callbacks = a["callbacks"]
    if not _is_list(callbacks) or not all(any(hasattr(cb, e) for e in (*EVENTS, "state_dict")) for cb in callbacks):
        raise bad("callbacks", callbacks, f"give a list of objects with some of {', '.join(EVENTS)} (or "
                  "state_dict/load_state_dict).")
    metrics = a["metrics"]
    if metrics is not None and (not isinstance(metrics, Mapping) or not all(callable(f) for f in metrics.values())):
        raise bad("metrics", metrics, "give {name: callable(output, batch) -> scalar}.")
    if not _is_list(a["early_stopping"]):
        raise bad("early_stopping", a["early_stopping"], "give a list of cadence.EarlyStopping(...).")
    if a["stages"] is not None and not _is_list(a["stages"]):
        raise bad("stages", a["stages"], "give a list of cadence.Stage(...).")
    groups = a["param_groups"]
    if groups is not None and (not isinstance(groups, Mapping) or not all(isinstance(v, Mapping)
                                                                          for v in groups.values())):
        raise bad("param_groups", groups, 'give {"glob": {"lr": ..., "weight_decay": ...}}.')
    inputs = a["inputs"]
    if inputs is not None and not isinstance(inputs, str) and (not _is_list(inputs) or not all(
            isinstance(n, str) for n in inputs)):
        raise bad("inputs", inputs, "give a list of field names, e.g. [x, y].")
    weights = a["loss_weights"]
    if weights is not None and (not isinstance(weights, Mapping) or not all(_is_number(w) for w in weights.values())):
        raise bad("loss_weights", weights, 'give {"part": weight}, e.g. {"recon": 1.0, "commit": 0.25}.')


def has_val(a: dict[str, Any]) -> bool:
    """Whether the run has validation data: ``val_data``, or ``valid_frac`` or ``val_indices`` to split it off."""
    return a["val_data"] is not None or a["valid_frac"] is not None or a.get("val_indices") is not None


def check_validation(a: dict[str, Any]) -> None:
    """Validation data and what needs it, early stopping, and the checkpoints' arguments."""
    if a["valid_frac"] is not None and a["val_data"] is not None:
        raise bad("valid_frac", a["valid_frac"], "val_data is given too; pass one or the other.")
    if a.get("val_indices") is not None and (a["val_data"] is not None or a["valid_frac"] is not None):
        other = "val_data" if a["val_data"] is not None else "valid_frac"
        raise bad("val_indices", a["val_indices"], f"{other} is given too; hold out items one way: drop {other} "
                  "or val_indices.")
    if a["split_by"] is not None and a["valid_frac"] is None:
        raise bad("split_by", a["split_by"], "it splits off validation data by group; set valid_frac too.")
    if a["val_every"] is not None and not has_val(a):
        raise bad("val_every", a["val_every"], "there is no validation data; pass val_data or valid_frac, "
                  "or leave val_every as None.")
    if a.get("early_stopping") and not has_val(a):
        raise bad("early_stopping", list(a["early_stopping"]), "it watches validation metrics, and there is no "
                  "validation data; pass val_data or valid_frac.")
    if a["keep_best"] and not has_val(a):
        raise bad("keep_best", a["keep_best"], "it keeps the checkpoint with the best validation metric, and there "
                  "is no validation data; pass val_data or valid_frac.")
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


def check_compile(a: dict[str, Any]) -> None:
    """``compile`` is False, True or "max"; ``compile_options`` are torch.compile's own keywords."""
    if a["compile"] not in (False, True, "max") or a["compile"] in (0, 1) and not isinstance(a["compile"], bool):
        raise bad("compile", a["compile"], 'use False, True (the model\'s forward and backward) or "max" (also the '
                  "clip and the optimizer step).")
    if a["compile"] and unwrap_compiled(a["model"]) is not a["model"]:
        raise bad("compile", a["compile"], "the model is already torch.compile'd; pass the plain module and let "
                  "compile= compile it, or leave compile=False.")
    options = a["compile_options"]
    if options is None:
        return
    known = ("mode", "dynamic", "backend", "options", "disable")
    if not isinstance(options, Mapping) or any(k not in known for k in options):
        raise bad("compile_options", options, f"give a mapping with some of {', '.join(known)} (torch.compile's "
                  "keywords; cadence sets fullgraph itself), e.g. {mode: max-autotune-no-cudagraphs}.")
    if not a["compile"]:
        raise bad("compile_options", dict(options), "they apply only when compiling; set compile=True or \"max\".")
    from .compiling import check_options

    problem = check_options(options)
    if problem:
        raise bad("compile_options", dict(options), f"torch.compile refuses them ({problem}); modes are those of "
                  "torch._inductor.list_mode_options(), backends those of torch._dynamo.list_backends(), and "
                  "options those of torch._inductor.list_options().")


def check_data(a: dict[str, Any]) -> None:
    """How validation is split off and how items are sampled: split_mode, split_by, sampler, balance_by."""
    from .data.labels import check_labels_spec
    from .data.split import SPLIT_MODES, check_valid_frac, resolve_mode

    if a["valid_frac"] is not None:
        check_valid_frac(a["valid_frac"])
    mode = a.get("split_mode")
    if mode is not None and mode not in SPLIT_MODES:
        raise bad("split_mode", mode, f"use one of {', '.join(SPLIT_MODES)} (default: groups with split_by, "
                  "else random).")
    if mode is not None and a["valid_frac"] is None:
        raise bad("split_mode", mode, "it says how valid_frac splits the training data; set valid_frac too.")
    check_labels_spec("split_by", a["split_by"])
    if a["valid_frac"] is not None:
        resolve_mode(mode, a["split_by"])
    balance_by = a["balance_by"]
    for value in (balance_by.values() if isinstance(balance_by, Mapping) else [balance_by]):
        check_labels_spec("balance_by", value)
    sampler = a["sampler"]
    if isinstance(sampler, Mapping) and not all(isinstance(k, str) for k in sampler):
        raise bad("sampler", dict(sampler), "give {'source': sampler} with source names as keys.")


def check_calls(a: dict[str, Any]) -> None:
    """How the model is called and stepped: part names, call keywords, optimizer options, clipping, validation."""
    names = a.get("part_names")
    if names is not None and (isinstance(names, str) or not all(isinstance(n, str) and n for n in names)
                              or len(set(names)) != len(names)):
        raise bad("part_names", names, "give a list of distinct names, one per entry of the model's parts tuple, "
                  "e.g. [recon, commit].")
    for key in ("forward_kwargs", "val_forward_kwargs"):
        value = a.get(key)
        if value is not None and (not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value)):
            raise bad(key, value, "give a mapping of keyword names to values, e.g. {return_loss_breakdown: true}.")
        if value and a.get("forward") is not None:
            raise bad(key, dict(value), "forward=callable(model, batch) makes the call itself; pass the keywords "
                      "inside it, or drop forward.")
    check_options(a["optimizer"], a.get("optimizer_options"))
    check_fused(a)
    for key in ("clip_per_group", "val_at_start", "find_unused_parameters"):
        if not isinstance(a.get(key, False), bool):
            raise bad(key, a[key], "use true or false.")
    if a.get("clip_per_group") and a["max_grad_norm"] is None:
        raise bad("clip_per_group", True, "it clips each parameter group to max_grad_norm; set max_grad_norm too.")
    if a.get("val_at_start") and not has_val(a):
        raise bad("val_at_start", True, "there is no validation data; pass val_data or valid_frac.")


def check_fused(a: dict[str, Any]) -> None:
    """``fused`` is None, True or False, for an optimizer by name that has a fused kernel, and agrees with
    ``optimizer_options["fused"]`` when both are given."""
    fused = a.get("fused")
    if fused is None:
        return
    if not isinstance(fused, bool):
        raise bad("fused", fused, "use true (the fused kernel, CPU and CUDA), false (never) or null (CUDA only).")
    if not isinstance(a["optimizer"], str):
        raise bad("fused", fused, "it picks the kernel of an optimizer chosen by name; give your callable or "
                  "class fused=... itself, or name the optimizer (adamw, adam, sgd).")
    if fused and a["optimizer"].lower() == "lion":
        raise bad("fused", fused, "lion has no fused kernel; use adamw, adam or sgd, or leave fused unset.")
    given = (a.get("optimizer_options") or {}).get("fused")
    if given is not None and given != fused:
        raise bad("fused", fused, f"optimizer_options says fused={given!r}; give it once.")


def check_plateau_and_eval(a: dict[str, Any]) -> None:
    """The plateau schedule's options, the validation batch size, fit()'s seeding switch."""
    plateau = a.get("plateau")
    if plateau is not None and not hasattr(plateau, "observe"):
        raise bad("plateau", plateau, "pass cadence.Plateau(monitor=..., factor=..., patience=...).")
    if a.get("schedule") == "plateau" and a.get("min_lr"):
        raise bad("min_lr", a["min_lr"], "with schedule='plateau' the floor is Plateau(min_lr=...); pass "
                  "plateau=Plateau(min_lr=...) and leave min_lr at 0.")
    if a.get("schedule") == "plateau" and not has_val(a):
        raise bad("schedule", "plateau", "it follows a validation metric, and there is no validation data; "
                  "pass val_data or valid_frac.")
    positive_int("val_batch_size", a.get("val_batch_size"), "use a positive number of items per validation "
                 "batch, or None for batch_size.", allow_none=True)
    if not isinstance(a.get("seed_at_fit", True), bool):
        raise bad("seed_at_fit", a["seed_at_fit"], "use true (fit() seeds torch, numpy and random) or false.")
