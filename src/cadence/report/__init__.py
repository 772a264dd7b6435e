"""``cadence report``: one self-contained HTML page of one or more runs, with plots and configs.

The page has no scripts and loads nothing: plots are inline SVG drawn by matplotlib (``pip install
"cadence[report]"``), so it opens from disk, in a mail attachment, or on a machine with no network.
"""

from __future__ import annotations

import datetime as dt
import html
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, bad
from ..loggers.build import flatten
from ..runs import RunSummary, format_duration, metric_series, read_config, read_records, require_run, summarize
from .plots import Line, svg_plot

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]  # matplotlib's tab10, one per run
# Line style per split: training solid, validation dashed; any other split (train_epoch, val_ema) its own.
SPLITS = {"train": "-", "val": "--", "train_epoch": ":"}
TOP_LEVEL = [("lr", "learning rate", ""), ("samples_per_s", "throughput", "samples / s"),
             ("grad_norm", "gradient norm", "")]


@dataclass
class Run:
    """What the page shows of one run folder."""

    name: str
    path: Path
    records: list[dict[str, Any]]
    config: dict[str, Any]
    summary: RunSummary


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """The runs to report, each checked to hold records; names made unique when folders share one."""
    folders = [require_run(p) for p in paths]
    names = [f.name for f in folders]
    if len(set(names)) < len(names):
        names = [str(f) for f in folders]
    return [Run(n, f, read_records(f), read_config(f), summarize(f)) for n, f in zip(names, folders)]


def write_report(paths: Sequence[str | Path], output: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write the report of the runs in ``paths``; returns its path (default ``RUN/report.html`` for one run)."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError('cadence report draws its plots with matplotlib, which is not installed; run pip install '
                          '"cadence[report]".')
    if not paths:
        raise bad("runs", [], "give at least one run folder.")
    runs = load_runs(paths)
    if output is None:
        if len(paths) > 1:
            raise bad("--output", None, "a report of several runs needs a file to go to; pass -o compare.html.")
        output = Path(paths[0]) / "report.html"
    output = Path(output)
    if output.is_dir():
        raise bad("--output", str(output), "it is a folder; give a file path, e.g. -o compare.html.")
    if output.exists() and not overwrite:
        raise bad("--output", str(output), "the file exists; choose another path with -o or pass --overwrite.")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render(runs), encoding="utf-8")
    return output


def render(runs: list[Run]) -> str:
    """The whole page as one HTML string."""
    title = "cadence report: " + ", ".join(r.name for r in runs)
    stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = [f"<h1>{_e(title)}</h1>", f"<p class=note>written {stamp}</p>", _summary_table(runs),
            "<h2>Curves</h2>", '<div class="plots">', *plots(runs), "</div>", "<h2>Config</h2>", _configs(runs)]
    return PAGE.format(title=_e(title), body="\n".join(body))


def plots(runs: list[Run]) -> list[str]:
    """One SVG per quantity: loss, each part (train solid, validation dashed), then lr, throughput, grad norm."""
    several = len(runs) > 1
    records = [rec for r in runs for rec in r.records if "loss" in rec]
    parts = sorted({k for rec in records for k in (rec.get("parts") or {})})
    splits = sorted({rec.get("split", "train") for rec in records}, key=lambda s: (s not in SPLITS, s))
    figures = []
    for name in ["loss", *parts]:
        lines = []
        for i, run in enumerate(runs):
            for split in splits:
                points = metric_series(run.records, f"{split}/{name}")
                if points:
                    label = f"{run.name} {split}" if several else split
                    lines.append(Line(label, COLORS[i % len(COLORS)], points, SPLITS.get(split, "-.")))
        if lines:
            figures.append(svg_plot(name, lines, log_if_wide=True))
    for key, title, unit in TOP_LEVEL:
        lines = [Line(run.name, COLORS[i % len(COLORS)], metric_series(run.records, key))
                 for i, run in enumerate(runs)]
        lines = [line for line in lines if line.points]
        if lines:
            figures.append(svg_plot(title, lines, unit))
    return [f"<figure>{svg}</figure>" for svg in figures]


def _summary_table(runs: list[Run]) -> str:
    rows = ["<tr><th></th><th>run</th><th>status</th><th>step</th><th>last train loss</th><th>best val loss</th>"
            "<th>wall time</th><th>folder</th></tr>"]
    for i, run in enumerate(runs):
        s = run.summary
        train = metric_series(run.records, "train/loss")
        best = "-" if s.best is None else f"{s.best:.4g} (step {s.best_step})"
        rows.append(f'<tr><td><span class=swatch style="background:{COLORS[i % len(COLORS)]}"></span></td>'
                    f"<td>{_e(run.name)}</td><td>{s.status}</td><td>{s.step}</td>"
                    f"<td>{f'{train[-1][1]:.4g}' if train else '-'}</td><td>{best}</td>"
                    f"<td>{format_duration(s.wall_s)}</td><td><code>{_e(str(run.path))}</code></td></tr>")
    return "<table>" + "\n".join(rows) + "</table>"


def _configs(runs: list[Run]) -> str:
    """The keys whose values differ between the runs, then every full config side by side."""
    out = []
    if len(runs) > 1:
        flat = [flatten(r.config) for r in runs]
        keys = sorted({k for f in flat for k in f})
        differ = [k for k in keys if len({repr(f.get(k, "-")) for f in flat}) > 1]
        head = "".join(f"<th>{_e(r.name)}</th>" for r in runs)
        rows = "".join(f"<tr><td><code>{_e(k)}</code></td>"
                       + "".join(f"<td>{_e(str(f.get(k, '-')))}</td>" for f in flat) + "</tr>" for k in differ)
        out.append("<h3>Keys that differ</h3>" + (f"<table><tr><th>key</th>{head}</tr>{rows}</table>" if differ
                                                   else "<p>The configs are the same.</p>"))
    cells = []
    for run in runs:
        path = run.path / "config.yaml"
        text = path.read_text(encoding="utf-8") if path.is_file() else "(no config.yaml: started from Python)"
        cells.append(f"<div><h3>{_e(run.name)}</h3><pre>{_e(text)}</pre></div>")
    out.append('<div class="configs">' + "".join(cells) + "</div>")
    return "\n".join(out)


def _e(text: str) -> str:
    return html.escape(text, quote=True)


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; background: #fff; }}
h1 {{ font-size: 20px; margin: 0 0 4px; }}
h2 {{ font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ddd; }}
.note {{ color: #777; margin: 0 0 12px; }}
table {{ border-collapse: collapse; margin: 8px 0; }}
th, td {{ border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }}
th {{ background: #f4f4f4; }}
.swatch {{ display: inline-block; width: 12px; height: 12px; border-radius: 2px; }}
.plots {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 12px; }}
figure {{ margin: 0; border: 1px solid #eee; }}
figure svg {{ width: 100%; height: auto; display: block; }}
.configs {{ display: grid; grid-template-columns: repeat(auto-fit, minmax(280px, 1fr)); gap: 12px; }}
pre {{ background: #f8f8f8; padding: 8px; overflow-x: auto; font-size: 12px; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""
