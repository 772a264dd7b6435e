"""Checkpoints: the on-disk format, faults during a save or in the files, retention, non-finite losses,
safe loading of weights, and asynchronous saving."""

from __future__ import annotations

import ast
import contextlib
import copy
import errno
import hashlib
import json
import pickle
import re
import struct
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash
from safetensors.torch import load_file
from torch import nn

import cadence
import cadence.checkpoint.format as ckpt_format
import cadence.checkpoint.saver as saver_module
from cadence import ConfigError
from cadence.checkpoint import CheckpointError, Checkpoints, verify
from helpers import MLP, CrashAt, assert_weights_equal, make_data, trainer
from resume_worker import StartedAt, build

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = Path(cadence.__file__).resolve().parent
TENSOR_FILES = {"model.safetensors", "optimizer.safetensors", "rng.safetensors"}
JSON_FILES = {"optimizer.json", "trainer.json", "manifest.json"}


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:09d}"


def listing(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def rewrite_manifest(folder: Path, name: str) -> None:
    """Make the manifest match the current bytes of ``name`` again (an attacker who also edits the manifest)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


class Payload:
    """Unpickling this creates ``path``: the stand-in for code a malicious checkpoint would run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def payload_bytes(sentinel: Path) -> bytes:
    return pickle.dumps({"weight": Payload(sentinel)}, protocol=2)


def test_the_payload_really_runs_when_unpickled(tmp_path):
    """The control for the tests below: plain unpickling of the payload does create its sentinel."""
    control = tmp_path / "control"
    pickle.loads(payload_bytes(control))
    assert control.exists()


# ----------------------------------------------------------------------------------------------- format
def assert_safetensors_or_json(path: Path) -> None:
    data = path.read_bytes()
    assert not data.startswith(b"PK\x03\x04"), f"{path.name} is a zip (torch.save)"
    if path.suffix == ".safetensors":
        (header_size,) = struct.unpack("<Q", data[:8])  # a u64 header length, then a JSON header
        assert 8 + header_size <= len(data), path.name
        assert isinstance(json.loads(data[8:8 + header_size]), dict), path.name
        assert all(isinstance(v, torch.Tensor) for v in load_file(path).values())
    else:
        assert not data.startswith(b"\x80"), f"{path.name} is a pickle"
        json.loads(data)


def test_checkpoint_folder_format(tmp_path):
    run = tmp_path / "run"
    model = MLP()
    t = trainer(model, make_data(50), batch_size=8, max_steps=12, checkpoint_every=4, run_dir=run)
    t.fit()
    assert listing(run) == ["step-000000004", "step-000000008", "step-000000012"]  # no temporary folders left
    folder = step_dir(run, 12)
    names = {p.name for p in folder.iterdir()}
    assert TENSOR_FILES | JSON_FILES <= names
    assert names <= TENSOR_FILES | JSON_FILES | {"running.safetensors"}

    meta = json.loads((folder / "trainer.json").read_text())
    assert meta["step"] == 12
    assert meta["data"]["epoch"] == 1 and meta["data"]["position"] == 5  # 7 steps per epoch: 12 = 7 + 5
    assert meta["cadence_version"] == cadence.__version__
    assert meta["torch_version"] == torch.__version__
    assert isinstance(meta["config_hash"], str) and meta["config_hash"]
    assert meta["batch_size"] == 8 and meta["data_length"] == 50

    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["writer"] == "cadence"
    assert set(manifest["files"]) == names - {"manifest.json"}
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"xxh3_128": xxhash.xxh3_128(data).hexdigest(), "size": len(data)}, name
    assert verify(folder)["files"] == manifest["files"]

    for name in names:  # every file is safetensors or JSON: no pickle, no torch.save zip
        assert_safetensors_or_json(folder / name)
    assert_safetensors_or_json(run / "final" / "model.safetensors")
    rng = load_file(folder / "rng.safetensors")
    assert {"torch", "numpy", "python"} <= set(rng) and all(v.dtype == torch.uint8 for v in rng.values())

    fresh = MLP(seed=1)  # plain safetensors, no cadence: the weights load into a new model
    fresh.load_state_dict(load_file(folder / "model.safetensors"))
    assert_weights_equal(fresh, model)


class Compiled(nn.Module):
    """Stands in for a ``torch.compile``d module: the real one under ``_orig_mod``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner

    def forward(self, *args: Any) -> Any:
        return self._orig_mod(*args)


def test_compiled_model_keys_are_normalised(tmp_path):
    run = tmp_path / "run"
    wrapped = Compiled(MLP())
    trainer(wrapped, make_data(20), batch_size=8, max_steps=3, checkpoint_every=3, run_dir=run).fit()
    for path in (step_dir(run, 3) / "model.safetensors", run / "final" / "model.safetensors"):
        tensors = load_file(path)
        assert not any(k.startswith("_orig_mod.") for k in tensors)
        plain = MLP(seed=1)
        plain.load_state_dict(tensors)
        assert_weights_equal(plain, wrapped._orig_mod)


# ----------------------------------------------------------------------------------------------- faults
# A run of 12 steps with checkpoints every 3 steps that crashes at step 10: checkpoints at 3, 6 and 9.
def reference_state(tmp_path: Path) -> dict[str, torch.Tensor]:
    t = build(tmp_path / "reference", max_steps=12)
    t.fit()
    return t.model.state_dict()


def crashed_run(run: Path, crash_at: int = 10) -> Path:
    t = build(run, max_steps=12, checkpoint_every=3, callbacks=[CrashAt(crash_at)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        t.fit()
    return run


def resume_to_end(run: Path, resume: Any = "auto") -> tuple[Any, list[int]]:
    started = StartedAt()
    t = build(run, max_steps=12, checkpoint_every=3, resume=resume, callbacks=[started])
    t.fit()
    return t, started.steps


def assert_state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class FailingWrite:
    """Replaces ``format._write``: raises ``error`` at the ``nth`` file written into ``folder_name``."""

    def __init__(self, folder_name: str, nth: int, error: BaseException) -> None:
        self.folder_name, self.nth, self.error = folder_name, nth, error
        self.count = 0
        self.real = ckpt_format._write

    def __call__(self, path: Path, data: bytes) -> dict[str, Any]:
        if self.folder_name in path.parent.name:
            self.count += 1
            if self.count == self.nth:
                raise self.error
        return self.real(path, data)


def test_crash_between_two_files_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    failing = FailingWrite("step-000000006", 3, RuntimeError("killed between two files"))
    monkeypatch.setattr(ckpt_format, "_write", failing)
    t = build(run, max_steps=12, checkpoint_every=3)
    with pytest.raises(RuntimeError, match="between two files"):
        t.fit()
    assert failing.count == 3
    monkeypatch.undo()
    assert listing(run) == ["step-000000003"]  # no step-6 folder, no temporary folder
    before = tree_bytes(step_dir(run, 3))
    verify(step_dir(run, 3))

    t, started = resume_to_end(run)
    assert started == [3]
    assert_state_equal(t.model.state_dict(), reference_state(tmp_path))
    assert tree_bytes(step_dir(run, 3)) == before


@pytest.mark.parametrize("background", [False, True], ids=["sync", "async"])
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, background):
    run = tmp_path / "run"
    monkeypatch.setattr(ckpt_format, "_write",
                        FailingWrite("step-000000006", 2, OSError(errno.ENOSPC, "No space left on device")))
    t = build(run, max_steps=12, checkpoint_every=3, async_checkpoint=background)
    try:
        t.fit()  # stopping with the error and going on are both allowed
    except OSError as err:
        assert err.errno == errno.ENOSPC
    monkeypatch.undo()
    assert "step-000000003" in listing(run)
    assert "step-000000006" not in listing(run)
    assert not [n for n in listing(run) if n.startswith(".")]
    verify(step_dir(run, 3))
    if t.step < 12:  # it stopped: the run resumes from the previous checkpoint
        t, started = resume_to_end(run)
        assert started == [3]
        assert_state_equal(t.model.state_dict(), reference_state(tmp_path))


def flip_a_bit(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's data
    path.write_bytes(bytes(data))


def truncate_manifest(folder: Path) -> None:
    path = folder / "manifest.json"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def delete_manifest(folder: Path) -> None:
    (folder / "manifest.json").unlink()


@pytest.mark.parametrize("damage", [flip_a_bit, truncate_manifest, delete_manifest])
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, damage):
    run = crashed_run(tmp_path / "run")
    damage(step_dir(run, 9))
    with pytest.warns(UserWarning, match="step-000000009"):
        t, started = resume_to_end(run)
    assert started == [6]
    assert_state_equal(t.model.state_dict(), reference_state(tmp_path))


@pytest.mark.parametrize("manifest", [
    pytest.param(b"[]", id="not-an-object"),
    pytest.param(b"\0" * 64, id="zero-filled"),
    pytest.param(b'{"writer": "cadence"}', id="no-files"),
    pytest.param(b'{"writer": "cadence", "files": null}', id="files-null"),
    pytest.param(b'{"writer": "cadence", "files": {"model.safetensors": {}}}', id="entry-without-size"),
])
def test_a_malformed_manifest_is_skipped_with_a_warning(tmp_path, manifest):
    run = crashed_run(tmp_path / "run")
    (step_dir(run, 9) / "manifest.json").write_bytes(manifest)
    with pytest.warns(UserWarning, match="step-000000009"):
        t, started = resume_to_end(run)
    assert started == [6]


def test_a_pickle_posing_as_model_safetensors_is_refused_and_never_run(tmp_path):
    run = crashed_run(tmp_path / "run")
    sentinel = tmp_path / "pwned"
    folder = step_dir(run, 9)
    (folder / "model.safetensors").write_bytes(payload_bytes(sentinel))
    rewrite_manifest(folder, "model.safetensors")
    verify(folder)  # the manifest matches: only reading the file itself can catch it

    started = StartedAt()
    t = build(run, max_steps=12, checkpoint_every=3, resume="auto", callbacks=[started])
    try:
        t.fit()
    except (CheckpointError, ConfigError) as err:  # refused with an error ...
        assert "model.safetensors" in str(err)
    else:  # ... or skipped for the previous checkpoint
        assert started.steps == [6]
    assert not sentinel.exists()

    from cadence.cli.main import main

    try:
        code = main(["export", str(run), "-o", str(tmp_path / "out.safetensors")])
    except CheckpointError:
        code = 1
    assert code != 0 and not (tmp_path / "out.safetensors").exists()
    assert not sentinel.exists()


def test_a_checkpoint_of_another_cadence_version_loads_and_a_newer_format_says_why_not(tmp_path):
    run = crashed_run(tmp_path / "run")
    folder = step_dir(run, 9)
    meta = json.loads((folder / "trainer.json").read_text())
    (folder / "trainer.json").write_text(json.dumps({**meta, "cadence_version": "0.0.1"}))
    rewrite_manifest(folder, "trainer.json")
    t, started = resume_to_end(run)
    assert started == [9]
    assert_state_equal(t.model.state_dict(), reference_state(tmp_path))

    run = crashed_run(tmp_path / "run2")
    folder = step_dir(run, 9)
    meta = json.loads((folder / "trainer.json").read_text())
    (folder / "trainer.json").write_text(json.dumps({**meta, "format": 99, "cadence_version": "9.0"}))
    rewrite_manifest(folder, "trainer.json")
    with pytest.raises(ConfigError, match="(?s)9.0.*upgrade"):
        resume_to_end(run)


@pytest.mark.parametrize("resumed", [pytest.param(False, id="end-of-fit"),
                                     pytest.param(True, id="resumed-finished-run")])
def test_a_kill_during_the_last_save_keeps_a_checkpoint(tmp_path, monkeypatch, resumed):
    """12 % 3 == 0: the loop checkpoints step 12; the end of fit() (of the run, or of a resume of the finished
    run) must not put that checkpoint at risk."""
    run = tmp_path / "run"
    if resumed:
        build(run, max_steps=12, checkpoint_every=3, keep_last=1).fit()
    real_replace = ckpt_format.os.replace

    def killed_after_moving_it(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        if Path(src).name == "step-000000012":  # the committed step 12 moved away, its new copy not yet in place
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ckpt_format.os, "replace", killed_after_moving_it)
    t = build(run, max_steps=12, checkpoint_every=3, keep_last=1, resume="auto" if resumed else None)
    with contextlib.suppress(KeyboardInterrupt):
        t.fit()
    monkeypatch.undo()
    found = Checkpoints(run / "checkpoints").latest()
    assert found is not None, f"the kill left the run with no checkpoint at all: {listing(run)}"
    assert found[0].name == "step-000000012"


# ----------------------------------------------------------------------------------------------- retention
def test_keep_last_keeps_the_newest(tmp_path):
    run = tmp_path / "run"
    trainer(MLP(), make_data(50), batch_size=8, max_steps=12, checkpoint_every=2, keep_last=2, run_dir=run).fit()
    assert listing(run) == ["step-000000010", "step-000000012"]


def test_keep_best_also_keeps_the_best(tmp_path):
    run = tmp_path / "run"
    x, y = make_data(50)
    vx, vy = make_data(20, seed=1)
    # validating on flipped labels: the better the model learns, the worse val/loss gets, so the best is early
    t = trainer(MLP(), (x, y), val_data=(vx, 1 - vy), batch_size=8, max_steps=12, lr=0.02, checkpoint_every=2,
                val_every=2, keep_last=2, keep_best=("val/loss", "min"), run_dir=run)
    t.fit()
    val = {r["step"]: r["loss"] for r in t.history if r["split"] == "val"}
    best = min(val, key=val.get)
    assert best not in (10, 12), "the test needs the best checkpoint to be an old one"
    assert listing(run) == sorted({f"step-{best:09d}", "step-000000010", "step-000000012"})


def test_keep_best_max_keeps_the_highest(tmp_path):
    run = tmp_path / "run"
    x, y = make_data(50)
    t = trainer(MLP(), (x, y), val_data=make_data(20, seed=1), batch_size=8, max_steps=12, lr=0.02,
                checkpoint_every=2, val_every=2, keep_last=1, keep_best=("val/loss", "max"), run_dir=run)
    t.fit()
    val = {r["step"]: r["loss"] for r in t.history if r["split"] == "val"}
    worst = max(val, key=val.get)
    assert worst != 12
    assert listing(run) == sorted({f"step-{worst:09d}", "step-000000012"})


def test_folders_cadence_did_not_write_are_never_deleted(tmp_path):
    run = crashed_run(tmp_path / "run")
    user = step_dir(run, 1)
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    other = run / "checkpoints" / "step-000000002"  # a manifest, but not one cadence wrote
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"writer": "someone else", "files": {}}))
    started = StartedAt()
    build(run, max_steps=12, checkpoint_every=3, keep_last=1, resume="auto", callbacks=[started]).fit()
    assert started.steps == [9]
    assert listing(run) == ["step-000000001", "step-000000002", "step-000000012"]
    assert (user / "notes.txt").read_text() == "mine"


def test_a_foreign_folder_does_not_take_the_place_of_the_new_checkpoint(tmp_path):
    run = tmp_path / "run"
    user = step_dir(run, 100)  # e.g. a copy the user put there; it sorts after every checkpoint of this run
    user.mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    with pytest.warns(UserWarning, match="step-000000100"):
        t = build(run, max_steps=6, checkpoint_every=3, keep_last=1, resume="auto")
        t.fit()
    assert (user / "notes.txt").read_text() == "mine"
    assert "step-000000006" in listing(run), "keep_last=1 deleted the checkpoint it had just committed"


# ----------------------------------------------------------------------------------------------- non-finite
class NanAt(MLP):
    """An MLP whose training loss is nan at the forward calls (1-based) in ``bad``."""

    def __init__(self, bad: Any) -> None:
        super().__init__()
        self.bad = bad
        self.calls = 0

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = super().forward(x, y)
        if self.training:
            self.calls += 1
            if self.calls in self.bad:
                loss = loss * float("nan")
        return loss


class Snapshots:
    """Copies of the weights and optimizer state after every step, and at every non-finite event."""

    def __init__(self) -> None:
        self.after: dict[int, tuple[dict, dict]] = {}
        self.at_skip: list[tuple[int, dict, dict, list]] = []

    @staticmethod
    def take(t: Any) -> tuple[dict, dict]:
        return copy.deepcopy(t.model.state_dict()), copy.deepcopy(t.optimizer.state_dict())

    def on_fit_start(self, t: Any) -> None:
        self.after[t.step] = self.take(t)

    def on_step_end(self, t: Any) -> None:
        self.after[t.step] = self.take(t)

    def on_log(self, t: Any, record: dict[str, Any]) -> None:
        if record.get("event") == "nonfinite":
            grads = [p.grad for p in t.model.parameters()]
            self.at_skip.append((t.step, *self.take(t), grads))


def assert_nested_equal(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_nested_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_nested_equal(x, y)
    else:
        assert a == b


def test_nonfinite_raise_stops_before_updating():
    model = NanAt(bad={5})
    snaps = Snapshots()
    t = trainer(model, make_data(50), batch_size=8, max_steps=8, lr=1e-2, callbacks=[snaps])
    with pytest.raises(FloatingPointError, match="step 5"):
        t.fit()
    assert t.step == 4
    assert_nested_equal(t.model.state_dict(), snaps.after[4][0])
    assert_nested_equal(t.optimizer.state_dict(), snaps.after[4][1])


def test_nonfinite_skip_leaves_weights_and_optimizer_untouched(tmp_path):
    model = NanAt(bad={5})
    snaps = Snapshots()
    t = trainer(model, make_data(50), batch_size=8, max_steps=8, lr=1e-2, on_nonfinite="skip", callbacks=[snaps],
                run_dir=tmp_path / "run")
    t.fit()
    assert t.step == 8 and model.calls == 9
    assert t.nonfinite_total == 1
    [(step, weights, optim, grads)] = snaps.at_skip
    assert step == 4
    assert_nested_equal(weights, snaps.after[4][0])
    assert_nested_equal(optim, snaps.after[4][1])
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)  # no nan gradient left behind
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in events if r.get("event") == "nonfinite"] == [4]


def test_max_nonfinite_in_a_row_raises():
    model = NanAt(bad=range(3, 1000))
    t = trainer(model, make_data(50), batch_size=8, max_steps=20, on_nonfinite="skip", max_nonfinite=3)
    with pytest.raises(FloatingPointError, match="3 steps in a row"):
        t.fit()
    assert t.step == 2 and t.nonfinite_total == 3


# ----------------------------------------------------------------------------------------------- safe loading
PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib"}


def unsafe_calls(source: str) -> list[str]:
    """Pickle imports and uses, and ``torch.load`` calls without ``weights_only=True``, in ``source``."""
    found = [m.group(0) for m in re.finditer(r"^\s*(import pickle|from pickle import).*$|pickle\.loads?\(",
                                             source, re.M)]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in PICKLERS]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLERS:
                found.append(f"from {node.module}")
            if node.module == "torch" and any(a.name == "load" for a in node.names):
                found.append("from torch import load")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            owner = ast.unparse(node.func.value)
            if owner == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    found.append(ast.unparse(node))
    return found


def test_the_unsafe_call_finder_finds_them():
    bad = ("import pickle\nfrom dill import loads\nx = torch.load(f)\ny = torch.load(f, weights_only=False)\n"
           "z = pickle.load(f)\n")
    assert len(unsafe_calls(bad)) >= 5
    assert unsafe_calls("x = torch.load(f, map_location='cpu', weights_only=True)\n") == []


def test_cadence_never_unpickles():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10 and (SRC / "weights.py") in files
    offenders = {str(p.relative_to(SRC)): found for p in files if (found := unsafe_calls(p.read_text()))}
    assert offenders == {}


def test_load_weights_reads_a_foreign_pt(tmp_path):
    source = MLP(seed=3)
    torch.save({"model": source.state_dict(), "epoch": 7, "lr": 0.1}, tmp_path / "old.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "ddp.ckpt")
    for name in ("old.pt", "ddp.ckpt"):
        target = MLP(seed=4)
        assert cadence.load_weights(target, tmp_path / name) is target
        assert_weights_equal(target, source)


@pytest.mark.parametrize("name", ["evil.pt", "evil.ckpt", "evil.safetensors"])
def test_load_weights_refuses_a_malicious_pickle(tmp_path, name):
    sentinel = tmp_path / "pwned"
    if name.endswith(".pt"):
        torch.save({"model": {"net.0.weight": Payload(sentinel)}}, tmp_path / name)
    else:
        (tmp_path / name).write_bytes(payload_bytes(sentinel))
    target = MLP()
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do; the sentinel check is the point
        cadence.load_weights(target, tmp_path / name)
    assert not sentinel.exists()
    assert_nested_equal(target.state_dict(), before)


def test_load_weights_lists_the_keys_that_do_not_fit(tmp_path):
    path = tmp_path / "w.safetensors"
    from cadence.weights import save_weights

    save_weights(MLP(), path)
    wide = nn.Module()
    wide.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2), nn.Linear(2, 2))
    with pytest.raises(ConfigError) as err:
        cadence.load_weights(wide, path)
    message = str(err.value)
    assert "missing: net.3.bias, net.3.weight" in message
    assert "net.0.weight (32, 8) vs model (16, 8)" in message


# ----------------------------------------------------------------------------------------------- async
def without_running(trainer_json: bytes) -> dict[str, Any]:
    meta = json.loads(trainer_json)
    meta.pop("running", None)  # the running means' bookkeeping: see the test below
    return meta


def test_async_checkpoints_are_identical_to_synchronous_ones(tmp_path):
    runs = {}
    for background in (False, True):
        run = tmp_path / f"run-{background}"
        build(run, max_steps=12, checkpoint_every=3, async_checkpoint=background).fit()
        runs[background] = run
    assert listing(runs[True]) == listing(runs[False]) == [f"step-{s:09d}" for s in (3, 6, 9, 12)]
    for name in listing(runs[False]):
        sync, background = tree_bytes(runs[False] / "checkpoints" / name), tree_bytes(runs[True] / "checkpoints" / name)
        assert sync.keys() == background.keys()
        assert sync["model.safetensors"] == background["model.safetensors"], name
        for file in sync:
            if file.endswith(".safetensors") or file == "optimizer.json":
                assert sync[file] == background[file], f"{name}/{file}"
        assert without_running(sync["trainer.json"]) == without_running(background["trainer.json"]), name
    assert (runs[True] / "final" / "model.safetensors").read_bytes() == \
        (runs[False] / "final" / "model.safetensors").read_bytes()


def test_async_checkpoint_is_the_state_at_its_step(tmp_path, monkeypatch):
    """The write of step 6 is held back (as on a slow disk) until the trainer waits for it at the next save."""
    blocked, gate = threading.Event(), threading.Event()
    real_encode, real_wait = ckpt_format.encode, saver_module.Saver.wait

    def slow_encode(files: Any) -> dict[str, bytes]:
        meta = files.get("trainer.json")
        if threading.current_thread() is not threading.main_thread() and meta and meta.get("step") == 6:
            blocked.set()
            gate.wait(timeout=30)
        return real_encode(files)

    def wait(self: Any) -> None:
        if blocked.is_set():
            gate.set()
        real_wait(self)

    runs = {False: tmp_path / "sync", True: tmp_path / "async"}
    build(runs[False], max_steps=9, checkpoint_every=3).fit()
    monkeypatch.setattr(ckpt_format, "encode", slow_encode)
    monkeypatch.setattr(saver_module.Saver, "wait", wait)
    build(runs[True], max_steps=9, checkpoint_every=3, async_checkpoint=True).fit()
    assert gate.is_set()
    sync = json.loads((step_dir(runs[False], 6) / "trainer.json").read_text())
    background = json.loads((step_dir(runs[True], 6) / "trainer.json").read_text())
    assert background == sync
    for step in (6, 9):  # the tensors too: step 9's copy waited for step 6's write before refilling the buffers
        for file in ("model.safetensors", "optimizer.safetensors"):
            assert (step_dir(runs[True], step) / file).read_bytes() == (step_dir(runs[False], step) / file).read_bytes()


def test_async_checkpoint_resumes_exactly(tmp_path):
    run = tmp_path / "run"
    t = build(run, max_steps=12, checkpoint_every=3, async_checkpoint=True, callbacks=[CrashAt(10)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        t.fit()
    for thread in threading.enumerate():  # let the background save of step 9 finish (a killed process loses it)
        if thread.name.startswith("cadence"):
            thread.join(timeout=30)
    t, started = resume_to_end(run)
    assert started == [9]
    assert_state_equal(t.model.state_dict(), reference_state(tmp_path))
