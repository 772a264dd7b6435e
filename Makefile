# The two README commands. Each sets up .venv on a fresh machine: torch first and pinned
# (an unpinned torch pulls gigabytes of CUDA packages), then cadence with its extras.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
TORCH   := torch==2.13.0

.PHONY: demo test lint bench bench-peers bench-gpu clean report-test

.venv/.demo-ready: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --disable-pip-version-check $(TORCH)
	$(PIP) install -q --disable-pip-version-check -e ".[demo]"
	touch $@

.venv/.dev-ready: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --disable-pip-version-check $(TORCH)
	$(PIP) install -q --disable-pip-version-check -e ".[dev]"
	touch $@

demo: .venv/.demo-ready
	$(PY) -m cadence fit

test: .venv/.dev-ready
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m pytest

# The report drawn by a real browser: installs Debian's chromium when missing, then runs the screenshot test
# (which fails, rather than skips, when chromium is still missing).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
report-test: .venv/.dev-ready
	command -v chromium >/dev/null || ($(SUDO) apt-get update && $(SUDO) apt-get install -y chromium)
	CADENCE_REQUIRE_CHROMIUM=1 $(PY) -m pytest tests/test_report.py -k chromium -rs

bench: .venv/.dev-ready
	$(PY) benchmarks/overhead.py

# cadence against Accelerate, Lightning Fabric and the Lightning Trainer (issue 10): installs the bench extra
# (torch stays the pinned one), then runs benchmarks/peers.py (about 7 minutes on 2 idle CPU cores).
.venv/.bench-ready: pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --disable-pip-version-check $(TORCH)
	$(PIP) install -q --disable-pip-version-check -e ".[bench]" $(TORCH)
	touch $@

bench-peers: .venv/.bench-ready
	$(PY) benchmarks/peers.py

# cadence against a hand-written loop on a GPU (GPT-2-small size, bf16, compile, fused AdamW); needs CUDA torch
bench-gpu:
	python benchmarks/gpu.py

clean:
	rm -rf .venv runs
