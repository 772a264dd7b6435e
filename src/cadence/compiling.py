"""``compile=True`` and ``compile="max"``: ``torch.compile`` in the Trainer, leaving what it saves untouched.

``True`` compiles the model's forward, and with it its backward (AOTAutograd traces both):
the module the step calls becomes ``torch.compile(model, fullgraph=True, **compile_options)``. At the first
graph break it is compiled again with ``fullgraph=False``, after one message naming the break. ``"max"`` also
compiles the gradient clipping and the optimizer step as one function (``step.clip`` + ``optimizer.step()``)
for ``torch.optim.Adam``, ``AdamW`` and ``SGD``, with each group's learning rate handed in as a tensor so
that a schedule does not recompile it every step. torch.optim's ``step`` breaks the graph on purpose (around
its ``no_grad``), so this function is never one full graph.

With inductor (torch.compile's default backend) the model is compiled with AOTAutograd's partitioner told to
recompute views instead of saving them (``torch._functorch.config.recompute_views``, which torch documents as
"generally a good idea since views are free to recompute" but leaves off). Left off, a transformer's FFN saves
its ReLU mask as a bool tensor for the backward, and on the CPU inductor's bool store costs more than the whole
fusion saves; with it on, the backward recomputes the mask from the activation it saves anyway. Other backends
are used as given.

``trainer.model`` stays the plain module: checkpoints, the EMA, exports and state-dict keys never see
``torch.compile``'s ``_orig_mod.`` prefix.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .step import clip

if TYPE_CHECKING:
    from .step import StepParts

# Optimizers whose step cadence compiles: their kernels take a tensor learning rate under torch.compile.
COMPILED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


class ViewRecomputingInductor(torch._TorchCompileInductorWrapper):
    """Inductor with ``mode`` and ``options`` as torch.compile gives them, partitioning with recomputed views."""

    def __call__(self, model_: Any, inputs_: Any, **kwargs: Any) -> Any:
        with torch._functorch.config.patch(recompute_views=True):
            return super().__call__(model_, inputs_, **kwargs)


def module_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """torch.compile's keywords for the model: inductor (the default) becomes ``ViewRecomputingInductor``."""
    options = dict(options)
    if options.get("backend", "inductor") != "inductor":
        return options
    options.pop("backend", None)
    backend = ViewRecomputingInductor(options.pop("mode", None), options.pop("options", None),
                                      options.get("dynamic"))
    return {**options, "backend": backend}


def check_options(options: Mapping[str, Any]) -> str:
    """What torch.compile would refuse in ``options`` (an unknown mode, backend or inductor option), or ""."""
    try:
        backend = module_options(options)["backend"]  # inductor's wrapper checks the mode and its options
        if isinstance(backend, str):
            torch._dynamo.lookup_backend(backend)
    except Exception as err:  # torch raises RuntimeError, InvalidBackend, ...: its message names the value
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return text.split(", known options are")[0][:300]  # not the list of all of inductor's options
    return ""


def check_compiler(setting: bool | str, options: Mapping[str, Any], device: torch.device) -> None:
    """On the CPU, inductor (torch.compile's default backend) builds C++: refuse ``compile`` at once when no C++
    compiler is found, rather than in the middle of the first step."""
    if setting is False or device.type != "cpu" or options.get("backend", "inductor") != "inductor":
        return
    from torch._inductor import config
    from torch._inductor.cpp_builder import cpp_compiler_search
    from torch._inductor.exc import InvalidCxxCompiler

    from .errors import bad

    search = tuple(config.cpp.cxx) if isinstance(config.cpp.cxx, (list, tuple)) else (config.cpp.cxx,)
    try:
        cpp_compiler_search(search)
    except InvalidCxxCompiler:
        tried = ", ".join(str(c) for c in search if c)
        raise bad("compile", setting, f"on the CPU torch.compile (inductor) builds C++, and no C++ compiler was "
                  f"found (tried {tried}); install g++ or clang (or set CXX), pass compile_options={{backend: "
                  "aot_eager}, or leave compile=False.") from None


class FullgraphFirst:
    """A compiled module's forward: ``fullgraph=True`` first; at a graph break, ``fullgraph=False`` for good."""

    def __init__(self, full: Callable[..., Any], partial: Callable[[], Callable[..., Any]],
                 say: Callable[[str], None]) -> None:
        self.call, self._partial, self._say = full, partial, say
        self.fullgraph = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.call(*args, **kwargs)
        except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError) as err:  # a break; a data-dependent branch
            if not self.fullgraph:
                raise
            reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
            self._say(f"compile: the model's forward does not compile as one graph ({reason}); compiling it "
                      "with fullgraph=False, so the parts between graph breaks run eagerly")
            self.fullgraph = False
            self.call = self._partial()
            return self.call(*args, **kwargs)


class QuietOptimizerProfiler(logging.Filter):
    """While cadence compiles the optimizer step, drops torch.compile's warning that a profiler
    ``record_function`` is ignored: the one it meets there is torch.optim's own (``Optimizer.step#AdamW.step``),
    not the user's, and the warning read like a fault in the middle of the progress lines. Elsewhere (a
    ``record_function`` in the user's model) the warning stays."""

    MESSAGE = "Profiler record function %s will be ignored"

    def __init__(self) -> None:
        super().__init__()
        self.active = False

    def install(self) -> None:
        logger = logging.getLogger("torch._dynamo.variables.ctx_manager")
        if self not in logger.filters:
            logger.addFilter(self)

    def __enter__(self) -> None:
        self.active = True

    def __exit__(self, *exc: object) -> None:
        self.active = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.active and record.msg == self.MESSAGE)


_QUIET = QuietOptimizerProfiler()


class CompiledUpdate:
    """``compile="max"``: the clip and the optimizer step of the step, compiled as one function.

    The learning rates stay floats in ``param_groups`` (what the schedule writes and the records read); for
    the compiled call each group's rate is copied into a 0-dim tensor of its own, so a new rate is new data,
    not a new constant to recompile for. A step where a group's rate is 0 runs eagerly.
    """

    def __init__(self, parts: StepParts, options: Mapping[str, Any]) -> None:
        self.parts = parts
        self._lrs: dict[int, torch.Tensor] = {}
        self._fn = torch.compile(self._update, **options)
        self.compiled_calls = 0
        _QUIET.install()

    def _update(self) -> torch.Tensor | None:
        grad_norm = clip(self.parts)
        self.parts.optimizer.step()
        return grad_norm

    def __call__(self, parts: StepParts) -> torch.Tensor | None:
        groups = parts.optimizer.param_groups
        floats = [g["lr"] for g in groups]
        if 0.0 in floats:
            # Compiled, torch's Adam takes its capturable form, which divides by the learning rate: at 0 (the
            # first step of a warm-up from 0, a decay to 0) weights whose gradient is exactly 0 would become NaN.
            return self._update()
        for i, (group, value) in enumerate(zip(groups, floats)):
            t = self._lrs.get(i)
            if t is None:
                device = group["params"][0].device if group["params"] else torch.device("cpu")
                t = self._lrs[i] = torch.tensor(0.0, dtype=torch.float64 if device.type == "cpu" else
                                                torch.float32, device=device)
            t.fill_(value)
            group["lr"] = t
        try:
            with _QUIET:
                grad_norm = self._fn()
            self.compiled_calls += 1
            return grad_norm
        finally:
            for group, value in zip(groups, floats):
                group["lr"] = value


class Compiler:
    """What the Trainer's ``compile`` and ``compile_options`` arguments do; ``Compiler(False)`` does nothing."""

    def __init__(self, setting: bool | str, options: Mapping[str, Any] | None, say: Callable[[str], None]) -> None:
        self.setting, self.options, self._say = setting, dict(options or {}), say
        self._compiled: nn.Module | None = None
        self._source: nn.Module | None = None  # the module compiled last (the model, or its DDP wrapper)
        self.forward: FullgraphFirst | None = None
        self.update_note = ""
        self.update: CompiledUpdate | None = None

    @property
    def enabled(self) -> bool:
        return self.setting is not False

    def attach(self, parts: StepParts) -> None:
        """Compile the module the step calls (again, when the strategy wrapped it anew) and, with "max", the
        clip + optimizer step (unless the optimizer or the precision cannot: then one message says so)."""
        if not self.enabled:
            return
        if parts.model is not self._compiled:  # the module the step calls is new (or wrapped anew)
            if parts.model is not self._source:
                self._source, self._compiled = parts.model, self._compile_module(parts.model)
            parts.model = self._compiled
        if self.setting == "max" and parts.update is None:
            why = self._update_blocker(parts)
            if why:
                self.update_note = f"; the clip and the optimizer step stay eager ({why})"
            else:
                parts.update = self.update = CompiledUpdate(parts, self.options)

    def _compile_module(self, module: nn.Module) -> nn.Module:
        options = module_options(self.options)
        compiled = torch.compile(module, fullgraph=True, **options)
        self.forward = FullgraphFirst(compiled.forward,
                                      lambda: torch.compile(module, fullgraph=False, **options).forward,
                                      self._say)
        compiled.forward = self.forward
        return compiled

    @staticmethod
    def _update_blocker(parts: StepParts) -> str:
        if parts.precision.scaler is not None:
            return 'precision="16" steps through the grad scaler, which is not compiled'
        if type(parts.optimizer) not in COMPILED_OPTIMIZERS:
            return f"cadence compiles the step of Adam, AdamW and SGD, not {type(parts.optimizer).__name__}"
        if parts.strategy.sharded:
            return "FSDP's sharded gradients are clipped and stepped eagerly"
        return ""

    def first_step_hooks(self) -> list[Callable[[Any], None]]:
        """An ``on_step_end`` hook reporting, once per ``fit()``, how long the first (compiling) step took."""
        if not self.enabled:
            return []
        start, done = time.perf_counter(), []

        def report(trainer: Any) -> None:
            if done:
                return
            done.append(True)
            seconds = time.perf_counter() - start
            fullgraph = self.forward is None or self.forward.fullgraph
            what = "model" if self.setting is True else "model, clip and optimizer step"
            later = ""
            if self.update is not None and not self.update.compiled_calls:  # a first step at learning rate 0
                what, later = "model", "; the clip and optimizer step compile at the first step whose lr is not 0"
            self._say(f"compile: step {trainer.step} took {seconds:.1f} s, compiling the {what} "
                                     f"(mode={self.options.get('mode', 'default')}, fullgraph={fullgraph})"
                                     + later + self.update_note)
            trainer._emit({"step": trainer.step, "epoch": trainer.stream.epoch, "split": "train",
                           "event": "compile", "seconds": seconds, "compile": self.setting,
                           "fullgraph": fullgraph})

        return [report]
