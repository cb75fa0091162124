"""``tnkd grid``: a data set's whole experiment grid in one command.

A grid is a folder of ``tnkd compare`` configs named ``grid*.yaml`` (one per student family:
MPS, TT network with different and with equal cores, TT-MLP ...). ``tnkd grid configs/mnist``
runs each of them in turn (teachers are trained on first use and reused, every run is logged to
W&B with the config's group), writes each config's results file, and ends with the Markdown
tables (those of the docs' results pages) and, with ``--plot``, one accuracy-vs-parameters plot of all families::

    tnkd grid configs/mnist --plot docs/results/mnist_accuracy_vs_params.png --data.init_args.root PATH

Any other ``--key value`` is passed to every ``tnkd compare`` (``--seeds '[0]'`` for a quick
look, ``--trainer '{accelerator: gpu}'`` ...). A config that fails is reported at the end; the others
still run.
"""

from __future__ import annotations

import argparse
import traceback
from pathlib import Path

import yaml

from tnkd.errors import debug_enabled, user_error_message
from tnkd.experiments.compare import main as run_compare
from tnkd.experiments.report import markdown, plot
from tnkd.experiments.results_file import results_target


def grid_configs(paths: list[str]) -> list[Path]:
    """The ``grid*.yaml`` files of each folder in ``paths`` (sorted), and each file as given."""
    found: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            configs = sorted(path.glob("grid*.yaml"))
            if not configs:
                raise FileNotFoundError(
                    f"{path} holds no grid*.yaml configs; pass a folder such as configs/mnist "
                    "or the config files themselves"
                )
            found += configs
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path} is neither a folder of grid configs nor a config file")
    return found


def main(args: list[str]) -> list[Path]:
    """Run the grid; returns the results files written."""
    parser = argparse.ArgumentParser(
        prog="tnkd grid",
        usage="tnkd grid FOLDER_OR_CONFIG... [--plot PNG] [--title T] [compare flags]",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--plot", help="write one accuracy-vs-parameters PNG of all results here")
    parser.add_argument("--title", default="", help="title of the tables and the plot")
    # the paths come first; everything from the first flag on is parsed as flags (so that the
    # values of compare's flags are never taken for paths)
    split = next((i for i, a in enumerate(args) if a.startswith("-")), len(args))
    ns, overrides = parser.parse_known_args(args[split:])
    if not split:
        parser.error("give at least one folder of grid*.yaml configs, or config files")
    configs = grid_configs(args[:split])
    written: list[Path] = []
    failed: list[tuple[Path, str]] = []
    for config in configs:
        try:
            settings = _read_grid_config(config)
            # a stopped grid's results file is resumed, a complete one never overwritten
            target = results_target(settings.get("results") or f"runs/results/{config.stem}.json")
            print(f"\n== tnkd grid: {config} -> {target}", flush=True)
            run_compare(["--config", str(config), *overrides, "--results", str(target)])
        except (Exception, SystemExit) as err:  # keep going: one family's failure is not all
            if isinstance(err, SystemExit) and not err.code:
                raise
            message = None if debug_enabled() else user_error_message(err)
            if message is None:
                traceback.print_exc()
                message = f"{type(err).__name__}: {err}"
            # on stdout with the progress: the one line on stderr, at the end, names them all
            print(f"tnkd grid: {config} failed: {message}", flush=True)
            failed.append((config, message))
            continue
        written.append(target)
    for path in written:
        print(markdown(path, f"{ns.title} {path.stem}".strip()), end="\n\n")
    if ns.plot and written:
        print(f"plot: {plot(written, ns.plot, ns.title)}")
    if failed:
        names = "; ".join(f"{c} ({message})" for c, message in failed)
        raise SystemExit(
            f"tnkd grid: error: {len(failed)} of {len(configs)} configs failed, the others' "
            f"results were written: {names}"
        )
    return written


def _read_grid_config(path: Path) -> dict:
    """The YAML mapping of a grid config; a one-line error naming the file otherwise."""
    try:
        settings = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{path} is not valid YAML{where}: {problem}") from err
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise ValueError(
            f"{path} holds a {type(settings).__name__}, not a mapping of tnkd compare settings"
        )
    return settings
