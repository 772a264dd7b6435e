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
from collections.abc import Callable
from typing import Any

from ..checkpoint.format import CheckpointError
from ..errors import ConfigError
from .classes import explain_class_error, import_class

# Trainer arguments the CLI fills itself, or that only make sense from Python.
SKIP = {"model", "train_data", "val_data", "run_dir", "overwrite", "resume"}
# Labels given as a list, a function, or {source: either}: typed here so that jsonargparse writes a list back as
# a list (with the Trainer's own hints, Hashable, it writes "Unable to serialize instance [...]", which no run
# can read back).
LABELS = {
    "split_by": (list[Any] | Callable[[Any], Any] | None,
                 "one group label per item, or a function item -> group (with valid_frac)"),
    "balance_by": (list[Any] | dict[str, list[Any] | Callable[[Any], Any]] | Callable[[Any], Any] | None,
                   "one label per item, a function item -> label, or {source: either} (sampler: balanced)"),
}


def fit_parser() -> Any:
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser
    from torch import nn

    from ..trainer import Trainer
    from .help import short_help_parser

    parser = short_help_parser(ArgumentParser)(
        prog="cadence fit", exit_on_error=False,
        description="Train a model. With no --config and no --model: the built-in digits demo.")
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with model, data and trainer sections")
    # fail_untyped=False: research classes leave their constructor arguments untyped; the value is passed as
    # the config gives it (a nested class_path is built) and check_fit names a required one left out
    parser.add_subclass_arguments(nn.Module, "model", required=True, fail_untyped=False,
                                  help="the model (class_path + init_args); its forward returns the loss")
    parser.add_argument("--data", type=dict[str, Any] | None, default=None,
                        help="the training data: class_path + init_args of a Dataset or tensors")
    parser.add_argument("--val_data", type=dict[str, Any] | None, default=None,
                        help="validation data, like --data (or use --trainer.valid_frac)")
    parser.add_argument("--test_data", type=dict[str, Any] | None, default=None,
                        help="test data, like --data: measured once after training, logged as test/...")
    parser.add_class_arguments(Trainer, "trainer", skip=SKIP | set(LABELS), instantiate=False, sub_configs=True,
                               fail_untyped=False, help="every Trainer argument, as --trainer.NAME")
    for name, (hint, text) in LABELS.items():
        parser.add_argument(f"--trainer.{name}", type=hint, default=None, help=text)
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
    parser.add_argument("--best", action=ActionYesNo, default=False,
                        help="export the checkpoint kept by trainer.keep_best instead of the newest")
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

        config = Path(argv[argv.index("--resume") + 1]) / "config.yaml"
        if config.is_file():  # else run_fit says what is wrong with --resume (not with a --config never given)
            return ["fit", "--config", str(config), *argv[1:]]
    # --model.NAME alone changes the demo's model; a class of one's own (--model X) needs its own data
    whole = ("--config", "--model", "--model.class_path", "-h", "--help")
    if argv[:1] == ["fit"] and not any(a.split("=")[0] in whole for a in argv):
        from ..demo import CONFIG

        return ["fit", "--config", str(CONFIG), *argv[1:]]
    return argv


def parse(parser: Any, argv: list[str]) -> Any:
    """Parse and check the command line: the demo or --resume config first, data sections merged."""
    from .checks import check_fit
    from .sections import prepare_fit_args

    if not any(a.split("=")[0].endswith(".help") for a in argv):  # --model.help CLASS: a class's own help
        argv = with_defaults(argv)
        if argv[:1] == ["fit"]:
            argv = ["fit", *prepare_fit_args(argv[1:])]
    cfg = parser.parse_args(argv)
    if cfg.command == "fit":
        check_fit(cfg.fit, argv)
    return cfg


def check_launch(parser: Any, rest: list[str]) -> None:
    """What the ``--nproc`` launcher checks before starting workers: the config and the run folder."""
    from pathlib import Path

    from ..rundir import check_config_file, check_run_dir
    from .checks import check_trainer_values
    from .fit import resume_folder

    cfg = parse(parser, ["fit", *rest]).fit
    check_trainer_values(cfg)
    if cfg.resume:
        resume_folder(cfg)
    elif cfg.run_dir:
        check_run_dir(Path(cfg.run_dir), cfg.overwrite, name="--run-dir")
        check_config_file(Path(cfg.run_dir), cfg.overwrite)


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


# examples of the forms an option takes, where the type alone says too little
EXAMPLES = {
    "model": "{class_path: my_module.MyModel, init_args: {dim: 64}}",
    "trainer.keep_best": "[val/loss, min]",
    "trainer.forward_kwargs": "{return_loss_breakdown: true}",
    "trainer.val_forward_kwargs": "{return_loss_breakdown: true}",
    "trainer.metrics": "{accuracy: my_module.accuracy}",
    "trainer.profile": "[5, 10]",
}


def _form(typehint: str, key: str) -> str:
    """A phrase for one member of a Union as jsonargparse prints it."""
    name = re.sub(r"<class '([\w.]+)'>", r"\1", typehint).strip()
    example = EXAMPLES.get(key)
    if name == "NoneType":
        return "null"
    if "Callable" in name.split("[")[0]:
        return ("a dotted path to a function (my_module.my_function) or a callable class as {class_path: "
                "my_module.MyClass, init_args: {...}}")
    if name.endswith("Module"):
        return f"a class as class_path + init_args, e.g. {example or '{class_path: my_module.MyModel}'}"
    if name.startswith("tuple["):
        size = len(re.split(r",\s*(?![^\[]*\])", name[6:-1]))
        return f"a list of {size} values" + (f", e.g. {example}" if example else "")
    if re.match(r"(collections\.abc\.|typing\.)?(Mapping|dict)\b", name):
        return "a mapping of names to values" + (f", e.g. {example}" if example else ", e.g. {name: value}")
    if re.match(r"(collections\.abc\.|typing\.)?(Sequence|list)\b", name):
        return "a list, e.g. [a, b]"
    short = name.rsplit(".", 1)[-1]
    plain = {"int": "an int", "float": "a number", "str": "a string", "bool": "true or false"}
    if short in plain:
        return plain[short]
    path = name if "." in name else f"cadence.{name}"
    return f"{{class_path: {path}, init_args: {{...}}}}"


def _members(subtypes: str) -> list[str]:
    """The members of jsonargparse's ``Subtypes: [...]`` list, split at the commas outside brackets."""
    out, depth, current = [], 0, ""
    for ch in subtypes:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(current.strip())
            current = ""
        else:
            current += ch
    return [m for m in [*out, current.strip()] if m and m != "Untyped"]


def expected_forms(key: str, subtypes: str) -> str:
    """The forms an option accepts, from jsonargparse's ``Subtypes: [...]`` list, joined with "or"."""
    return " or ".join(dict.fromkeys(_form(m, key) for m in _members(subtypes)))


def _import_problem(key: str, value: str, subtypes: str) -> str | None:
    """Why a dotted path given to a callable option does not import (None: it imports, or is no dotted path)."""
    if "Callable" not in subtypes or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)+", value):
        return None
    try:
        import_class(value, key)
    except ConfigError as err:
        return str(err).replace(f"{key}.class_path=", f"{key}=", 1)
    return None


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
    about_class = explain_class_error(message)
    if about_class:
        return about_class
    nested = re.search(r"NestedArg\(key='([\w.]+)', val='(.*?)'\)", message)
    if where and nested:
        example = {"model": "my_module.MyModel", "trainer.optimizer": "torch.optim.AdamW"}.get(where.group(1),
                                                                                             "CLASS_PATH")
        return (f"--{where.group(1)}.{nested.group(1)}={nested.group(2)}: {where.group(1)} is not given as a class "
                f"(class_path + init_args) here, so it has no option {nested.group(1)!r}; give the class first, "
                f"e.g. --{where.group(1)} {example} --{where.group(1)}.{nested.group(1)} {nested.group(2)}.")
    inner = re.findall(r'Parser key "([\w.]+)":\s*\n?\s*Expected a <class \'(\w+)\'>\. Got value: (.+)', message)
    if inner:
        name, expected, value = inner[-1]
        prefix = f"{where.group(1)}.init_args." if where and where.group(1) != name else ""
        return f"{prefix}{name}={value.strip()!r}: expected a value of type {expected}; fix the value."
    single = re.fullmatch(r'Parser key "([\w.]+)":\s*(?:- Expected a path .*\n\s*)?- Expected a (<class [^>]+>)\. '
                          r"Got value: (.+)", message, flags=re.S)
    if single:
        return f"{single.group(1)}={single.group(3).strip()!r}: expected {_form(single.group(2), single.group(1))}; " \
               "fix the value."
    given = re.search(r"Given value: (.+)", message)
    subtypes = re.search(r"Subtypes: \[(.*)\]", message)
    if where and given and subtypes:
        value = given.group(1).strip()
        unknown = _import_problem(where.group(1), value, subtypes.group(1))
        if unknown:
            return unknown
        forms = expected_forms(where.group(1), subtypes.group(1))
        return f"{where.group(1)}={value!r}: expected {forms}; fix the value."
    if "Problems parsing config" in message or "File does not exist" in message:
        return f"--config: {message.splitlines()[0]} ({' '.join(message.splitlines()[1:]).strip()}); " \
               "give the path of a readable YAML file.".replace(" ()", "")
    return " ".join(line.strip() for line in message.splitlines())


def short_warnings() -> None:
    """cadence's own warnings (a damaged metrics.jsonl, a skipped checkpoint) as one ``cadence: warning:`` line."""
    import warnings

    default = warnings.formatwarning
    if getattr(default, "cadence", False):
        return

    def short(message: Any, category: Any, filename: str, *rest: Any, **kw: Any) -> str:
        if f"{os.sep}cadence{os.sep}" in filename:
            return f"cadence: warning: {message}\n"
        return default(message, category, filename, *rest, **kw)

    short.cadence = True  # type: ignore[attr-defined]
    warnings.formatwarning = short


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for bad input)."""
    if os.getcwd() not in sys.path:  # class paths of the project being trained resolve from where cadence runs
        sys.path.insert(0, os.getcwd())
    argv = list(sys.argv[1:] if argv is None else argv)
    short_warnings()
    from .launch import die_with_launcher, wants_launch

    die_with_launcher()  # a worker of cadence fit --nproc never outlives its launcher
    parser = root_parser()
    try:
        if wants_launch(argv):
            from .launch import launch

            return launch(argv, lambda rest: check_launch(parser, rest))  # checked once, before any worker starts
        cfg = parse(parser, argv)
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
        if int(os.environ.get("RANK") or 0) == 0:  # under several processes rank 0 alone reports it ...
            print(f"cadence: error: {err}", file=sys.stderr)
        from .launch import leave_error

        leave_error(str(err))  # ... and cadence fit --nproc shows those of other ranks that differ from it
        return 2
    except OSError as err:  # a read-only folder, a full disk, an over-long name: one sentence, no traceback
        from ..rundir import describe_os_error

        print(f"cadence: error: {describe_os_error(err)}", file=sys.stderr)
        return 1
    except Exception as err:
        if type(err).__name__ != "ArgumentError":
            raise
        print(f"cadence: error: {explain(err, parser)}", file=sys.stderr)
        return 2
    return 0
