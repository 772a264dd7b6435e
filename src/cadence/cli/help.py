"""``cadence fit --help``: one line per option, the launcher's options included, short enough to read.

jsonargparse's own help lists every known subclass of a class-typed option (hundreds of ``torch.nn``
modules for ``--model``) and wraps each option over several lines; this one gives each option one line with
its default, and points to ``--model.help CLASS`` for a class's own arguments.
"""

from __future__ import annotations

import argparse
from typing import Any

LAUNCHER = (
    ("--nproc N", "start N worker processes on this machine through torchrun (docs/distributed.md)"),
    ("--nnodes M", "machines in the run (default: 1); each runs the same command"),
    ("--node-rank R", "this machine's rank, 0..M-1, with a static master (default: 0)"),
    ("--master-addr A", "the address of node 0 (default: 127.0.0.1)"),
    ("--master-port P", "a free port on node 0 (default: 29500)"),
    ("--rdzv-endpoint H:P", "a c10d rendezvous instead of a static master (needs no node ranks)"),
    ("--rdzv-id ID", "the rendezvous's id, the same on every machine (default: cadence)"),
    ("--max-restarts K", "times torchrun restarts failed workers (default: 0)"),
)
HEAD = ("usage: cadence fit [--config FILE] [--model CLASS] [--model.NAME VALUE] [--data CLASS] "
        "[--data.NAME VALUE]\n                   [--trainer.NAME VALUE ...] [--run-dir DIR] [--resume RUN] "
        "[--nproc N ...]")


def _default(action: argparse.Action) -> str:
    value = action.default
    if value is None or value == argparse.SUPPRESS or isinstance(value, bool) and action.nargs == 0:
        return ""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, (list, tuple)) and not value:
        return ""
    return f" (default: {value})"


def _line(names: str, text: str, width: int = 26) -> str:
    pad = " " * max(1, width - len(names))
    return f"  {names}{pad}{' '.join(text.split())}"


def fit_help(parser: Any) -> str:
    """The help text of the ``fit`` parser."""
    lines = [HEAD, "", parser.description or "", "", "options:"]
    trainer: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        names = ", ".join(sorted((o for o in action.option_strings if not o.endswith("+")),
                                 key=lambda o: (o.startswith("--") and "_" in o, len(o))))
        if names.endswith(".help") or action.dest == "trainer":
            continue
        text = action.help or ""
        if action.dest == "print_config":
            text = "print the resolved config (to feed back with --config) and exit"
        if action.dest.startswith("trainer."):
            trainer.append(_line(names, text + _default(action), 30))
        else:
            lines.append(_line(names, text + _default(action)))
    lines.append(_line("--model.NAME VALUE", "an argument of the model's class (also --model.init_args.NAME)"))
    lines.append(_line("--data.NAME VALUE", "an argument of the data class (also --data.init_args.NAME; "
                                            "--val_data.NAME likewise)"))
    lines.append(_line("--model.help CLASS", "list the arguments of a class, e.g. --model.help cadence.demo."
                                             "DigitsMLP"))
    lines += ["", "trainer (every Trainer argument; see docs/trainer.md):", *trainer]
    lines += ["", "launcher (several processes through torchrun):", *(_line(n, t) for n, t in LAUNCHER)]
    lines += ["", "Class paths are looked up in the working directory and the installed packages. "
                  "See docs/cli.md."]
    return "\n".join(lines) + "\n"


def short_help_parser(base: type) -> type:
    """A subclass of jsonargparse's ``ArgumentParser`` whose ``format_help`` is :func:`fit_help`."""

    class FitParser(base):  # type: ignore[misc, valid-type]
        def format_help(self) -> str:
            dests = {a.dest for a in self._actions}
            if "model" in dests and "trainer.batch_size" in dests:  # not a class's own help (--model.help X)
                return fit_help(self)
            return super().format_help()

    return FitParser
