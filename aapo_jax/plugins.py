"""User plugins: modules named by `--import` that register algorithms and rewards, imported
before a command reads its config; and the command-line parsing that imports them first."""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Sequence
from pathlib import Path

FLAG = "import"
FLAG_HELP = (
    "A module to import before the config is read (repeatable), e.g. your own file that adds "
    "an algorithm to aapo_jax.algorithms.ALGORITHMS or a reward to "
    "aapo_jax.rewards.HOST_REWARDS. Run from its directory or put it on PYTHONPATH; the "
    "modules are recorded with the run's checkpoints."
)


class PluginError(ImportError):
    """A plugin module named by `--import` (or recorded with a checkpoint) cannot be imported."""


def import_modules(names: Sequence[str], *, context: str = "") -> tuple[str, ...]:
    """Import each module of `names` in order (a no-op for one already imported).

    Modules are found on `sys.path`: for `python -m experiments.train` from the
    repository root, that includes the current directory.

    Args:
      names: dotted module names, e.g. ("my_algorithm",).
      context: why the modules are needed, for the error message (e.g. "the run in W was
        trained with it").

    Returns:
      The names, as a tuple (what a run records).

    Raises:
      PluginError: a module cannot be imported; the message names it and the reason.
    """
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:
            why = f" ({context})" if context else ""
            raise PluginError(
                f"--{FLAG}={name}: cannot import module {name!r}{why}: {type(e).__name__}: {e}. "
                "Run from the directory that holds it, or add that directory to PYTHONPATH."
            ) from e
    return tuple(names)


def names_in_argv(argv: Sequence[str]) -> list[str]:
    """The modules named by `--import=NAME` / `--import NAME` in a command line, in order."""
    names = []
    args = list(argv)
    for i, arg in enumerate(args):
        match = re.fullmatch(rf"--?{FLAG}(?:=(.*))?", arg)
        if match is None:
            continue
        value = match.group(1)
        if value is None and i + 1 < len(args):
            value = args[i + 1]
        if value:
            names.append(value)
    return names


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl flag parsing for the experiment commands: `app.run(main, flags_parser=parse_flags)`.

    The `--import` modules are imported first, so that a config file may name their
    algorithms (`--config=configs/quickstart.py:algo=mine`). A `--config.FIELD=VALUE`
    override of a field the config does not have fails naming it, with the valid fields
    there (`configs.override_error`), instead of ml_collections' bare AttributeError;
    any other flag error exits as absl's own parser does.
    """
    from absl import flags

    try:
        import_modules(names_in_argv(argv[1:]))
        try:
            return flags.FLAGS(argv)
        except AttributeError as e:
            raise _explain_override(argv) or e from None
    except (PluginError, ValueError, flags.Error) as e:
        sys.stderr.write(f"FATAL Flags parsing error: {e}\n")
        sys.stderr.write("Pass --helpshort or --helpfull to see help on flags.\n")
        sys.exit(1)


def _explain_override(argv: Sequence[str]) -> ValueError | None:
    """The error of the first `--config.PATH=VALUE` whose PATH the config file lacks."""
    from aapo_jax import configs

    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        return None
    config = load_config_file(spec)
    for arg in argv:
        match = re.fullmatch(r"--config\.([\w.]+)(?:=(.*))?", arg)
        if match:
            error = configs.override_error(config, match.group(1), match.group(2))
            if error is not None:
                return error
    return None


def load_config_file(spec: str):
    """The ConfigDict of a `--config` value, `path/to/file.py[:argument]`, as `get_config`
    returns it (no overrides applied)."""
    path, _, argument = spec.partition(":") if ".py:" in spec else (spec, "", "")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(argument) if argument else module.get_config()
