"""``compile=True`` / ``"max"``: the loss curve stays within tolerance of eager; checkpoints, resume, the EMA and
the exported weights work as without it; a model that does not compile as one graph falls back with one message.

Compiling is slow on two CPU cores (10-30 s per compiled fit, less once inductor's cache holds the kernels), so
the compiled cases are marked slow and kept few. Shapes stay fixed (64 items, batches of 16) so that no case
recompiles for a short last batch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from cadence import EMA, ConfigError, Trainer, load_weights
from helpers import MLP, make_data

pytestmark = pytest.mark.usefixtures("one_thread")

# Compiled kernels sum in another order than eager ones: the loss curves agree to float32 rounding, not bitwise.
RTOL, ATOL = 1e-4, 1e-6


def make(compile: bool | str, steps: int = 50, **kw) -> Trainer:
    return Trainer(MLP(seed=0), make_data(64), batch_size=16, max_steps=steps, lr=1e-2, schedule="cosine",
                   warmup_steps=5, max_grad_norm=0.5, log_every=1, progress=False, compile=compile, **kw)


def curve(t: Trainer) -> torch.Tensor:
    return torch.tensor(t.history["train/loss"], dtype=torch.float64)


@pytest.mark.slow
def test_compiled_loss_curve_matches_eager_within_tolerance():
    eager = make(False)
    eager.fit()
    for mode in (True, "max"):
        t = make(mode)
        t.fit()
        assert len(curve(t)) == 50
        torch.testing.assert_close(curve(t), curve(eager), rtol=RTOL, atol=ATOL, msg=f"compile={mode}")
        for (name, a), b in zip(t.model.named_parameters(), eager.model.parameters()):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=f"compile={mode}: {name}")
        events = [r for r in t.history if r.get("event") == "compile"]
        assert len(events) == 1 and events[0]["step"] == 1 and events[0]["seconds"] > 0
        assert events[0]["compile"] == mode and events[0]["fullgraph"] is True
        assert t._parts.update is not None if mode == "max" else t._parts.update is None
        assert type(t.model) is MLP  # the Trainer's model stays the plain module; only the step's call compiles


def safetensors_keys(folder: Path) -> dict[str, list[str]]:
    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out[str(path.relative_to(folder))] = list(f.keys())
    return out


@pytest.mark.slow
def test_compiled_run_checkpoints_resumes_and_exports(tmp_path):
    whole = make("max", steps=12, run_dir=tmp_path / "whole", ema=EMA(beta=0.9))
    whole.fit()
    make("max", steps=6, run_dir=tmp_path / "cut", ema=EMA(beta=0.9), checkpoint_every=3).fit()
    resumed = make("max", steps=12, run_dir=tmp_path / "cut", ema=EMA(beta=0.9), checkpoint_every=3,
                   resume="auto")
    resumed.fit()
    assert resumed.step == 12
    torch.testing.assert_close(curve(resumed), curve(whole), rtol=RTOL, atol=ATOL)
    for a, b in zip(resumed.model.parameters(), whole.model.parameters()):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    for a, b in zip(resumed.ema.model.parameters(), whole.ema.model.parameters()):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)

    files = safetensors_keys(tmp_path / "cut")
    assert "final/model.safetensors" in files and "final/ema.safetensors" in files
    plain = [k for k, _ in MLP().named_parameters()]
    for name, keys in files.items():
        assert not any("_orig_mod." in k for k in keys), name
    assert sorted(files["final/model.safetensors"]) == sorted(plain)
    loaded = load_weights(MLP(seed=1), tmp_path / "cut" / "final" / "model.safetensors")
    for a, b in zip(loaded.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


class Breaks(MLP):
    """A forward that cannot be one graph: a graph break between the layers."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.net[0](x)
        torch._dynamo.graph_break()
        return nn.functional.cross_entropy(self.net[2](self.net[1](h)), y)


@pytest.mark.slow
def test_a_graph_break_falls_back_to_fullgraph_false_with_one_message(capsys):
    t = Trainer(Breaks(seed=0), make_data(64), batch_size=16, max_steps=6, log_every=3, compile=True)
    t.fit()
    out = capsys.readouterr().out
    assert out.count("does not compile as one graph") == 1, out
    assert "fullgraph=False" in out
    event = next(r for r in t.history if r.get("event") == "compile")
    assert event["fullgraph"] is False
    assert t.step == 6 and all(torch.isfinite(torch.tensor(t.history["train/loss"])))


@pytest.mark.slow
@pytest.mark.parametrize("schedule", [{"schedule": "constant"},  # a warm-up from lr 0
                                      {"schedule": "multistep", "milestones": [6], "gamma": 0.0}])  # then lr 0
def test_max_steps_at_a_zero_learning_rate_like_eager(schedule):
    """Compiled, torch's Adam takes its capturable form, which divides by the learning rate: at lr 0 (the first
    step of a warm-up from 0, the last of a decay to 0) weights whose gradients are exactly 0 became NaN.
    cadence takes such a step eagerly."""
    x, y = make_data(64)
    x[:, 7] = 0.0  # an input that is always 0: its first-layer weights get gradients of exactly 0
    runs = {}
    for mode in (False, "max"):
        t = Trainer(MLP(seed=0), (x, y), batch_size=16, max_steps=12, lr=1e-2, warmup_steps=3, weight_decay=0.01,
                    max_grad_norm=1.0, log_every=1, progress=False, compile=mode, **schedule)
        t.fit()
        runs[mode] = t
    for p, q in zip(runs[False].model.parameters(), runs["max"].model.parameters()):
        assert torch.isfinite(q).all()
        torch.testing.assert_close(q, p, rtol=RTOL, atol=1e-5)
    torch.testing.assert_close(curve(runs["max"]), curve(runs[False]), rtol=RTOL, atol=ATOL)


def test_torch_optims_own_record_function_warning_is_dropped_only_while_the_step_compiles(caplog):
    """torch.compile warns that torch.optim's own profiler ``record_function`` is ignored when it compiles the
    optimizer step; cadence drops that warning there, and only there."""
    import logging

    from cadence.compiling import QuietOptimizerProfiler

    quiet = QuietOptimizerProfiler()
    quiet.install()
    log = logging.getLogger("torch._dynamo.variables.ctx_manager")
    try:
        with caplog.at_level(logging.WARNING, logger=log.name):
            with quiet:
                log.warning(QuietOptimizerProfiler.MESSAGE, "record_function")
                log.warning("another warning")
            log.warning(QuietOptimizerProfiler.MESSAGE, "record_function")
    finally:
        log.removeFilter(quiet)
    assert [r.getMessage() for r in caplog.records] == [
        "another warning", "Profiler record function record_function will be ignored"]


class FeedForward(nn.Module):
    """A transformer's feed-forward block over (batch, sequence, width): ReLU between two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x))).square().mean()


def saved_dtypes(fn) -> list[torch.dtype]:
    """The dtypes of the tensors autograd saves for the backward while ``fn()`` runs."""
    saved: list[torch.dtype] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


@pytest.mark.slow
def test_compiled_model_recomputes_the_relu_mask_instead_of_saving_it():
    """torch.compile's default partitioner saves the ReLU's mask as a bool tensor for the backward here (and on
    the CPU inductor's bool store costs more than fusion saves); cadence's compile recomputes views, so the mask
    is recomputed from the activation saved anyway and no bool tensor is saved."""
    x = torch.randn(4, 16, 8)
    by_hand = torch.compile(FeedForward())
    assert torch.bool in saved_dtypes(lambda: by_hand(x).backward())

    t = Trainer(FeedForward(), torch.randn(16, 16, 8), forward=lambda m, b: m(b), batch_size=4, max_steps=2,
                progress=False, compile=True)
    saved = saved_dtypes(t.fit)
    assert saved and torch.bool not in saved
    assert t.history["train/loss"]


def test_compile_options_reach_inductor_and_other_backends_are_kept():
    from cadence.compiling import ViewRecomputingInductor, module_options

    options = module_options({"mode": "max-autotune-no-cudagraphs", "dynamic": False,
                              "options": {"epilogue_fusion": False}})
    backend = options.pop("backend")
    assert isinstance(backend, ViewRecomputingInductor) and options == {"dynamic": False}
    assert backend.config["max_autotune"] is True and backend.config["epilogue_fusion"] is False
    assert module_options({"backend": "eager", "mode": None}) == {"backend": "eager", "mode": None}
    assert isinstance(module_options({"backend": "inductor"})["backend"], ViewRecomputingInductor)


@pytest.mark.parametrize("kw, fix", [
    ({"compile": "fast"}, 'use False, True'),
    ({"compile": 1}, 'use False, True'),
    ({"compile": True, "compile_options": {"fullgraph": True}}, "cadence sets fullgraph itself"),
    ({"compile_options": {"mode": "reduce-overhead"}}, "set compile=True"),
    ({"compile": True, "compile_options": {"mode": "fast"}}, r"\(Unrecognized mode=fast.*list_mode_options"),
    ({"compile": "max", "compile_options": {"backend": "nope"}}, r"Invalid backend: 'nope'.*list_backends"),
    ({"compile": True, "compile_options": {"options": {"nosuch": 1}}}, r"option nosuch\);.*list_options\(\)\.$"),
])
def test_bad_compile_arguments_name_the_fix(kw, fix):
    with pytest.raises(ConfigError, match=fix):
        Trainer(MLP(), make_data(64), max_steps=2, progress=False, **kw)


def test_an_already_compiled_model_is_refused():
    with pytest.raises(ConfigError, match="already torch.compile'd"):
        Trainer(torch.compile(MLP()), make_data(64), max_steps=2, progress=False, compile=True)


def test_max_keeps_the_step_eager_where_it_cannot_compile_it():
    t = Trainer(MLP(), make_data(64), max_steps=2, progress=False, compile="max", optimizer="lion")
    assert t._parts.update is None and "Lion" in t._compiler.update_note


DDP_WORKER = '''
import os, sys
import torch
sys.path.insert(0, sys.argv[2])
from helpers import MLP, make_data
from cadence import Trainer

torch.set_num_threads(1)
mode = {"false": False, "true": True}.get(sys.argv[3], sys.argv[3])
t = Trainer(MLP(seed=0), make_data(64), batch_size=8, grad_accum=2, max_steps=8, lr=1e-2, max_grad_norm=1.0,
            log_every=4, progress=False, compile=mode)
t.fit()
torch.save(torch.cat([p.detach().flatten() for p in t.model.parameters()]),
           os.path.join(sys.argv[1], f"{sys.argv[3]}-{os.environ['RANK']}.pt"))
'''


@pytest.mark.slow
def test_compile_max_under_ddp_keeps_the_ranks_equal_and_close_to_eager(tmp_path):
    """DDP wraps the model first; the wrapped module is compiled (no_sync passes through it for grad_accum)."""
    import os
    import socket
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    tests = str(Path(__file__).resolve().parent)
    for mode in ("false", "max"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                               "--master-addr", "127.0.0.1", "--master-port", str(port), str(script), str(tmp_path),
                               tests, mode], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"})
        assert proc.returncode == 0, proc.stderr[-6000:]
    eager, rank0, rank1 = (torch.load(tmp_path / f"{m}.pt") for m in ("false-0", "max-0", "max-1"))
    assert torch.equal(rank0, rank1)  # the ranks stay in step
    torch.testing.assert_close(rank0, eager, rtol=RTOL, atol=1e-5)
