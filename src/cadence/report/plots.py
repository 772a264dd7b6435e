"""The report's plots: matplotlib figures rendered to inline SVG (no JavaScript, no network, no files).

``Figure`` is used directly rather than ``pyplot``, so nothing touches a global figure or GUI backend.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

Points = list[tuple[int, float]]


@dataclass
class Line:
    """One curve: ``points`` as (step, value), drawn in ``color`` and ``style`` (dotted unless solid)."""

    label: str
    color: str
    points: Points
    style: str = "-"


def svg_plot(title: str, lines: list[Line], ylabel: str = "", log_if_wide: bool = False) -> str:
    """A line plot against step as an ``<svg>`` element; ``log_if_wide``: log scale when values span decades."""
    import matplotlib
    from matplotlib.figure import Figure

    # Text stays text (small, searchable; the browser's sans-serif draws it); a fixed salt keeps ids stable.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "cadence", "font.size": 9}):
        fig = Figure(figsize=(5.6, 3.3))
        fig.subplots_adjust(left=0.13, right=0.97, bottom=0.14, top=0.91)  # fixed: a layout engine costs 2x
        ax = fig.add_subplot()
        for line in lines:
            steps, values = zip(*line.points)
            ax.plot(steps, values, color=line.color, label=line.label, linewidth=1.6, linestyle=line.style,
                    marker=None if line.style == "-" else "o", markersize=3)
        values = [v for line in lines for _, v in line.points if v == v]
        if log_if_wide and values and min(values) > 0 and max(values) / min(values) > 100:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML declaration and DOCTYPE: the SVG goes inline into HTML
    return re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
