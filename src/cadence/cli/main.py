"""The ``cadence`` command: ``cadence fit`` trains from a YAML config with ``model``, ``data`` and ``trainer``.

The options are derived from the ``Trainer``'s signature by jsonargparse (the library LightningCLI uses), so
every ``Trainer`` argument is a ``--trainer.NAME`` option, any class is ``class_path`` + ``init_args``, and
the resolved config printed by ``--print_config`` replays the same run when fed back with ``--config``.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from typing import Any

from ..checkpoint.format import CheckpointError
from ..errors import ConfigError

# Trainer arguments the CLI fills itself, or that only make sense from Python.
SKIP = {"model", "train_data", "val_data", "run_dir", "overwrite", "resume"}


def fit_parser() -> Any:
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser
    from torch import nn

    from ..trainer import Trainer

    parser = ArgumentParser(prog="cadence fit", exit_on_error=False,
                            description="Train a model. With no --config and no --model: the built-in digits demo.")
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with model, data and trainer sections")
    parser.add_subclass_arguments(nn.Module, "model", required=True,
                                  help="the model (class_path + init_args); its forward returns the loss")
    parser.add_argument("--data", type=dict[str, Any] | None, default=None,
                        help="the training data: class_path + init_args of a Dataset or tensors")
    parser.add_argument("--val_data", type=dict[str, Any] | None, default=None,
                        help="validation data, like --data (or use --trainer.valid_frac)")
    parser.add_class_arguments(Trainer, "trainer", skip=SKIP, instantiate=False, sub_configs=True,
                               help="every Trainer argument, as --trainer.NAME")
    parser.add_argument("--run_dir", "--run-dir", type=str | None, default=None,
                        help="the run folder (default: runs/<date>-<time>-<name>)")
    parser.add_argument("--name", type=str | None, default=None,
                        help="the run's name in the default folder (default: the config file's name)")
    parser.add_argument("--overwrite", action=ActionYesNo, default=False,
                        help="replace what an earlier run wrote into the run folder")
    parser.add_argument("--resume", type=str | None, default=None,
                        help="continue the run in this folder from its newest valid checkpoint, with its own "
                             "config.yaml (overrides such as a higher --trainer.max_steps still apply)")
    return parser


def export_parser() -> Any:
    from jsonargparse import ActionYesNo, ArgumentParser

    parser = ArgumentParser(prog="cadence export", exit_on_error=False,
                            description="Write a run's newest weights alone, as one safetensors file.")
    parser.add_argument("run", type=str, help="the run folder")
    parser.add_argument("-o", "--output", type=str, default="model.safetensors", help="the file to write")
    parser.add_argument("--ema", action=ActionYesNo, default=False, help="export the EMA weights")
    parser.add_argument("--overwrite", action=ActionYesNo, default=False, help="replace an existing output file")
    return parser


def report_parser() -> Any:
    from jsonargparse import ActionYesNo, ArgumentParser

    parser = ArgumentParser(prog="cadence report", exit_on_error=False,
                            description="Write one self-contained HTML page with the curves and configs of runs.")
    parser.add_argument("runs", type=str, nargs="+", help="run folders (several are overlaid)")
    parser.add_argument("-o", "--output", type=str | None, default=None,
                        help="the HTML file (default RUN/report.html; required for several runs)")
    parser.add_argument("--overwrite", action=ActionYesNo, default=False, help="replace an existing output file")
    return parser


def runs_parser() -> Any:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="cadence runs", exit_on_error=False,
                            description="List the runs in a folder: status, step, best validation value, wall time.")
    parser.add_argument("dir", type=str, nargs="?", default="runs", help="a folder of runs, or one run folder")
    parser.add_argument("--metric", type=str, default="val/loss", help="the validation value to rank by")
    parser.add_argument("--mode", type=str, default="min", help='"min" (lower is better) or "max"')
    return parser


def root_parser() -> Any:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="cadence", exit_on_error=False,
                            description="cadence: a small, fast, exact PyTorch trainer.")
    commands = parser.add_subcommands(required=True, dest="command")
    commands.add_subcommand("fit", fit_parser(), help="train a model (no arguments: the built-in digits demo)")
    commands.add_subcommand("export", export_parser(), help="write a run's weights alone as safetensors")
    commands.add_subcommand("report", report_parser(), help="write an HTML page with the curves of runs")
    commands.add_subcommand("runs", runs_parser(), help="list the runs in a folder and their status")
    return parser


def with_defaults(argv: list[str]) -> list[str]:
    """``cadence fit --resume RUN`` reads RUN/config.yaml first; with no config and no model, the demo's."""
    if argv[:1] == ["fit"] and "--resume" in argv[:-1]:
        from pathlib import Path

        run = argv[argv.index("--resume") + 1]
        return ["fit", "--config", str(Path(run) / "config.yaml"), *argv[1:]]
    if argv[:1] == ["fit"] and not any(a.startswith(("--config", "--model", "-h", "--help")) for a in argv):
        from ..demo import CONFIG

        return ["fit", "--config", str(CONFIG), *argv[1:]]
    return argv


def known_keys(parser: Any) -> list[str]:
    keys = []
    for action in parser._actions:
        for option in action.option_strings:
            keys.append(option.lstrip("-"))
    sub = getattr(parser, "_subcommands_action", None)
    if sub is not None:
        for p in sub._name_parser_map.values():
            keys += known_keys(p)
    return keys


def explain(err: Exception, parser: Any) -> str:
    """One paragraph from jsonargparse's report: the key, the value and the fix."""
    message = str(err).strip()
    unknown = re.search(r"unrecognized arguments:\s*--?([\w.-]+)", message)
    group = re.search(r"Group '([\w.]+)' does not accept option '([\w.]+)'", message)
    other = re.search(r"does not accept option '([\w.]+)'", message)
    key = (unknown.group(1) if unknown else f"{group.group(1)}.{group.group(2)}" if group
           else other.group(1) if other else None)
    if key:
        close = difflib.get_close_matches(key, known_keys(parser), n=1, cutoff=0.6)
        hint = f"did you mean --{close[0]}?" if close else "see `cadence fit --help` for the valid options."
        return f"{key}: unknown option; {hint}"
    where = re.search(r'Parser key "([\w.]+)"', message)
    cls = re.search(r"Problem with given class_path '([\w.]+)':\s*\n\s*(.+)", message)
    if cls and not cls.group(2).lstrip().startswith("Parser key"):
        return (f"{where.group(1) if where else 'class_path'}.class_path={cls.group(1)!r}: it does not import "
                f"({cls.group(2).strip()}); give the full dotted path of an installed class, e.g. "
                "cadence.demo.DigitsMLP.")
    inner = re.findall(r'Parser key "([\w.]+)":\s*\n?\s*Expected a <class \'(\w+)\'>\. Got value: (.+)', message)
    if inner:
        name, expected, value = inner[-1]
        prefix = f"{where.group(1)}.init_args." if where else ""
        return f"{prefix}{name}={value.strip()!r}: expected a value of type {expected}; fix the value."
    given = re.search(r"Given value: (.+)", message)
    subtypes = re.findall(r"<class '(\w+)'>", message.split("Errors:")[0])
    if where and given and subtypes:
        types = " or ".join(dict.fromkeys("None" if t == "NoneType" else t for t in subtypes))
        return f"{where.group(1)}={given.group(1).strip()!r}: expected {types}; fix the value."
    if "Problems parsing config" in message or "File does not exist" in message:
        return f"--config: {message.splitlines()[0]} ({' '.join(message.splitlines()[1:]).strip()}); " \
               "give the path of a readable YAML file.".replace(" ()", "")
    return " ".join(line.strip() for line in message.splitlines())


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for bad input)."""
    if os.getcwd() not in sys.path:  # class paths of the project being trained resolve from where cadence runs
        sys.path.insert(0, os.getcwd())
    argv = list(sys.argv[1:] if argv is None else argv)
    from .launch import wants_launch

    if wants_launch(argv):
        from .launch import launch

        try:
            return launch(argv)
        except ConfigError as err:
            print(f"cadence: error: {err}", file=sys.stderr)
            return 2
    argv = with_defaults(argv)
    parser = root_parser()
    try:
        cfg = parser.parse_args(argv)
        if cfg.command == "fit":
            from .fit import run_fit

            return run_fit(parser._subcommands_action._name_parser_map["fit"], cfg.fit)
        if cfg.command == "export":
            from .export import export

            return export(cfg.export)
        if cfg.command == "report":
            from .report import report

            return report(cfg.report)
        if cfg.command == "runs":
            from .runs import runs

            return runs(cfg.runs)
    except (ConfigError, CheckpointError) as err:
        print(f"cadence: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if type(err).__name__ != "ArgumentError":
            raise
        print(f"cadence: error: {explain(err, parser)}", file=sys.stderr)
        return 2
    return 0
