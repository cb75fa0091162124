"""The ``tnkd`` command: Lightning's CLI for single runs, plus ``tnkd compare``, ``grid`` and ``report``.

* ``tnkd fit|validate|test|predict --config FILE`` is a :class:`lightning.pytorch.cli.LightningCLI`
  over any LightningModule (``tnkd.training.TeacherModule``, ``tnkd.training.DistillationModule``)
  and any tnkd data module, configured by ``class_path`` / ``init_args`` YAML. Runs log to
  Weights & Biases offline by default (``runs/wandb``; ``wandb sync`` uploads them later).
* ``tnkd compare --config FILE`` runs :func:`tnkd.experiments.compare.compare`, ``tnkd grid``
  every grid file of a folder, ``tnkd report`` tables and plots from results files, and
  ``tnkd study --config FILE`` a Renyi alpha x T study (:mod:`tnkd.experiments.study`).

Errors a user's input, files or disk cause end the command with one line on stderr (the setting
or file, what was wrong, how to fix it) and exit status 2; ``TNKD_DEBUG=1`` shows the traceback.
Before anything is trained or written, every run checks its data, its model against the data,
the checkpoint it resumes from and the folders and files it will write. A run stopped by SIGTERM
(or Ctrl-C) writes ``last.ckpt``, prints the command that resumes it and exits with status 143
(130); see :mod:`tnkd.training.preemption`.

stderr holds errors only: Lightning's notices, Python warnings and W&B's banner go to stdout (or
nowhere), and the seed is set without Lightning's ``Seed set to N`` line. More checks:

* a ``tnkd fit`` holds an advisory lock on its run folder while it writes there
  (:class:`~tnkd.training.outputs.RunLock`); a second run of the same name is refused;
* ``tnkd fit --ckpt_path`` (a resume) with model settings other than the checkpoint's
  hyperparameters is refused (Lightning would silently replace them by the checkpoint's);
* ``tnkd validate|test|predict`` without ``--ckpt_path`` is refused (an untrained model)
  unless ``--allow_untrained true``;
* a full disk is one line naming the file and the space left; no partial checkpoint and no W&B
  run of the failed run are left.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

import tnkd.training.preemption as preemption
from tnkd.data.base import ClassificationDataModule
from tnkd.errors import debug_enabled, is_disk_full, note_output, user_error_message
from tnkd.experiments.files import unique_path
from tnkd.experiments.wandb_runs import without_unset_settings
from tnkd.training.callbacks import RunCheckpoint, checkpoint_folder
from tnkd.training.modules import DistillationModule, TeacherModule, check_checkpoint_shapes
from tnkd.training.outputs import (
    RunLock,
    check_checkpoint_file,
    check_writable,
    discard_wandb_run,
)
from tnkd.training.predictions import PredictionWriter

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.WandbLogger",
        "init_args": {"project": "tnkd", "save_dir": "runs", "offline": True},
    },
    "max_epochs": 30,
    # runs without a logger (``--trainer.logger false``) keep their files under runs/, not the cwd
    "default_root_dir": "runs",
}


class SaveConfigToRun(SaveConfigCallback):
    """Save the resolved config inside the run (W&B run files, or the logger's folder).

    Unlike Lightning's default it never overwrites another run's ``config.yaml`` and never stops
    a run because one exists: each run's config goes to its own folder (or a numbered name);
    a run without a logger keeps it under ``DEFAULT_ROOT_DIR/configs/``, never in the working
    folder itself.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:  # noqa: D102
        text = self.parser.dump(self.config, skip_none=False)
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                Path(logger.experiment.dir, "tnkd-config.yaml").write_text(text)
                logger.experiment.config.update({"cli_config": text}, allow_val_change=True)
                return
        folder = (
            Path(trainer.log_dir) if trainer.loggers else Path(trainer.default_root_dir, "configs")
        )
        folder.mkdir(parents=True, exist_ok=True)
        unique_path(folder / "config.yaml").write_text(text)


#: the data-module stage each subcommand sets up
STAGES = {"fit": "fit", "validate": "validate", "test": "test", "predict": "predict"}

#: short flags: the run-config names (:mod:`tnkd.training.run_config`) as command-line flags
SHORT_FLAGS = {
    "temperature": "--model.init_args.temperature",
    "beta": "--model.init_args.beta",
    "lr": "--model.init_args.lr",
    "bond_dim": "--model.init_args.student.init_args.bond_dim",
    "seed": "--seed_everything",
    "epochs": "--trainer.max_epochs",
}
#: short flags that are parameters of the divergence (given with ``--divergence NAME``)
DIVERGENCE_FLAGS = ("alpha", "skew")


def expand_short_flags(args: list[str]) -> list[str]:
    """Turn the short flags into the config keys they stand for.

    ``--temperature``, ``--beta``, ``--lr``, ``--bond_dim``, ``--seed``, ``--epochs``, and
    ``--divergence NAME`` with its parameters ``--alpha``, ``--skew`` (one mapping:
    ``--model.init_args.divergence={"name": NAME, "alpha": A}``). They are the keys a run's
    config shows in W&B, so a sweep's parameters can carry the same names.
    """
    import json

    out: list[str] = []
    divergence: dict[str, Any] = {}
    at: int | None = None
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        known = name in SHORT_FLAGS or name in DIVERGENCE_FLAGS or name == "divergence"
        if not known:
            out.append(arg)
            i += 1
            continue
        if not eq:
            if i + 1 >= len(args):
                raise ValueError(f"--{name} needs a value")
            value = args[i + 1]
            i += 1
        i += 1
        if name in SHORT_FLAGS:
            out += [SHORT_FLAGS[name], value]
            continue
        if at is None:
            at = len(out)
        divergence[name] = value if name == "divergence" else float(value)
    if divergence:
        if "divergence" not in divergence:
            given = ", ".join(f"--{k}" for k in divergence)
            raise ValueError(
                f"{given} needs --divergence NAME (e.g. --divergence renyi --alpha 0.5)"
            )
        name = divergence.pop("divergence")
        spec = json.dumps({"name": name, **divergence}) if divergence else name
        out[at:at] = ["--model.init_args.divergence", spec]
    return out


class TnkdCLI(LightningCLI):
    """LightningCLI with tnkd's defaults and checks.

    W&B offline logger, seeded runs, safe config saving, a :class:`RunCheckpoint` on every fit,
    ``--ckpt_path last`` resolved from the run's name, everything checked before the Trainer
    starts (see the module docstring), and ``tnkd predict --predictions FILE``.
    """

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        if args is None:
            sys.argv[1:] = expand_short_flags(sys.argv[1:])
        elif isinstance(args, list):
            args = expand_short_flags(args)
        no_exit = {"exit_on_error": False}
        self._lock: RunLock | None = None
        try:
            self._start(args, run, no_exit)
        except BaseException as error:
            if is_disk_full(error):  # no W&B run is left of a run that could not be written
                discard_wandb_run()
            raise
        finally:
            if self._lock is not None:  # the run has ended (or failed): the folder is free
                self._lock.release()

    def _start(self, args: list[str] | None, run: bool, no_exit: dict[str, Any]) -> None:
        super().__init__(
            LightningModule,
            ClassificationDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=SaveConfigToRun,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=0,
            args=args,
            run=run,
            auto_configure_optimizers=False,
            parser_kwargs={**no_exit, **{sub: dict(no_exit) for sub in STAGES}},
        )

    # ---- parsing -------------------------------------------------------------------------

    def _set_seed(self) -> None:
        """Seed as Lightning does, without its ``Seed set to N`` notice (the seed is in the config).

        The notice went to stderr before everything else, so that an error that followed was
        two lines there where one is promised.
        """
        seed = self._get(self.config, "seed_everything")
        if seed is False:
            return
        seed = seed_everything(None if seed is True else seed, workers=True, verbose=False)
        target = self.config[self.subcommand] if self.subcommand else self.config
        target["seed_everything"] = seed

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> Any:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in ("validate", "test", "predict"):
            parser.add_argument(
                "--allow_untrained",
                type=bool,
                default=False,
                help="evaluate the model without --ckpt_path, untrained, on purpose",
            )
        if subcommand == "predict":
            parser.add_argument(
                "--predictions",
                type=str | None,
                default=None,
                help="CSV file for the predictions (default: runs/predictions/NAME.csv)",
            )
        return parser

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path last`` from the run's name and check the file before Lightning reads it."""
        subcommand = self.config.get("subcommand")
        if subcommand:
            config = self.config[subcommand]
            path = config.get("ckpt_path")
            if path == "last":
                config["ckpt_path"] = self._last_checkpoint(subcommand, config)
            elif path and path not in ("best", "hpc", "registry"):
                check_checkpoint_file(path)
            path = config.get("ckpt_path")
            if subcommand == "fit" and path and Path(path).is_file():
                # a resume; validate/test/predict evaluate the model as trained (Lightning uses
                # the checkpoint's settings, which is right there)
                checkpoint = torch.load(path, weights_only=True, map_location="cpu")
                check_same_settings(config.get("model"), checkpoint, path)
        super()._parse_ckpt_path()  # Lightning puts the checkpoint's hyperparameters in the config

    def _last_checkpoint(self, subcommand: str, config: Any) -> str | None:
        folder = _checkpoint_folder(config)
        if folder is None:
            raise ValueError(
                "--ckpt_path last needs a named run (--trainer.logger.init_args.name NAME) or a "
                "run without a logger (--trainer.logger false); pass the checkpoint file itself "
                "otherwise"
            )
        last = folder / "last.ckpt"
        if last.is_file():
            check_checkpoint_file(last)
            return str(last)
        if subcommand == "fit":
            print(f"tnkd fit: no checkpoint in {folder} yet: starting from the beginning")
            return None
        raise FileNotFoundError(
            f"--ckpt_path last: {last} does not exist; train the run first (tnkd fit with the "
            "same config), or pass --ckpt_path FILE"
        )

    # ---- checks before the Trainer starts --------------------------------------------------

    def instantiate_classes(self) -> None:
        """Instantiate model and data, check them (:meth:`preflight`), then the Trainer."""
        if self.subcommand is not None:
            _log_model_offline(self.config[self.subcommand].get("trainer"))
        self.config_init = self.parser.instantiate(self.config)
        self.datamodule = self._get(self.config_init, "data")
        self.model = self._get(self.config_init, "model")
        self._add_configure_optimizers_method_to_model(self.subcommand)
        if self.subcommand in STAGES:
            self.preflight(self.subcommand)
        self.trainer = self.instantiate_trainer()

    def preflight(self, subcommand: str) -> None:
        """Everything that would otherwise fail late, checked before any training or writing."""
        config = self.config[subcommand]
        model, dm = self.model, self.datamodule
        _refuse_untrained_teacher(config)
        if subcommand == "fit":
            self._check_outputs(config)
        elif subcommand == "predict":
            target = config.get("predictions")
            if target:
                check_writable(target, "--predictions", folder=False)
                if Path(target).exists():
                    raise FileExistsError(
                        f"predictions file {target} already exists; choose another "
                        "--predictions path (nothing was overwritten)"
                    )
        ckpt_path = config.get("ckpt_path")
        if subcommand != "fit" and not ckpt_path and not config.get("allow_untrained"):
            role = "teacher" if isinstance(model, TeacherModule) else "student"
            raise ValueError(
                f"tnkd {subcommand} without --ckpt_path would use an untrained {role} (random "
                "weights); pass --ckpt_path last (the named run's last checkpoint) or "
                f"--ckpt_path FILE, or --allow_untrained true to {subcommand} it untrained on "
                "purpose"
            )
        if dm is not None and not getattr(dm, "download", False):
            dm.setup(STAGES[subcommand])
        if hasattr(model, "check_data"):  # TeacherModule, DistillationModule
            model.check_data(dm)
        if ckpt_path and Path(ckpt_path).is_file():
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            check_checkpoint_shapes(model, checkpoint)
        if isinstance(model, DistillationModule) and dm is not None:
            model.attach_cached_logits(dm, STAGES[subcommand])
        if subcommand == "fit":
            self._lock_run_folder(config)

    def _lock_run_folder(self, config: Any) -> None:
        """Hold the run folder's lock while this run writes there (rank 0 only; see RunLock)."""
        from lightning.fabric.utilities.rank_zero import _get_rank

        folder = _checkpoint_folder(config)
        if folder is None or _get_rank() not in (None, 0):
            return
        self._lock = RunLock(
            folder,
            "run folder",
            "give this run another name (--trainer.logger.init_args.name NEW)",
        ).acquire()

    def _check_outputs(self, config: Any) -> None:
        trainer = config.get("trainer") or {}
        root = trainer.get("default_root_dir") or "runs"
        check_writable(root, "--trainer.default_root_dir")
        note_output(root)
        for logger in _logger_configs(trainer.get("logger")):
            save_dir = _init_args(logger).get("save_dir")
            if save_dir:
                check_writable(save_dir, "--trainer.logger.init_args.save_dir")
                note_output(save_dir)
        folder = _checkpoint_folder(config)
        if folder is not None:
            check_writable(folder, "the checkpoint folder")
            note_output(folder)
            existing = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
            if existing and not config.get("ckpt_path"):
                raise FileExistsError(
                    f"checkpoint folder {folder} already holds {len(existing)} checkpoint(s) of "
                    "an earlier run; resume it with --ckpt_path last, or start a new run under "
                    "another name (--trainer.logger.init_args.name NEW), or move those files away"
                )
        hparams = getattr(self.model, "hparams", {})
        if hparams.get("export_path"):
            export = hparams["export_path"]
            check_writable(export, "--model.init_args.export_path", folder=False)
            if Path(export).exists():
                raise FileExistsError(
                    f"teacher export_path {export} already exists; delete it or choose another "
                    "path (--model.init_args.export_path NEW); nothing was overwritten"
                )
        if hparams.get("teacher_cache"):
            check_writable(hparams["teacher_cache"], "--model.init_args.teacher_cache")

    # ---- subcommands ---------------------------------------------------------------------

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Add a :class:`~tnkd.training.callbacks.RunCheckpoint` unless the config names a checkpoint.

        W&B loggers lose the settings that Lightning passes as None
        (:func:`~tnkd.experiments.wandb_runs.without_unset_settings`).
        """
        config = self._get(self.config_init, "trainer", default={})
        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        wanted = config.get("enable_checkpointing") is not False
        if (
            wanted
            and "callbacks" not in kwargs
            and not any(isinstance(c, Checkpoint) for c in configured)
        ):
            kwargs["callbacks"] = [*configured, RunCheckpoint()]
        trainer = super().instantiate_trainer(**kwargs)
        for logger in trainer.loggers:  # before anything starts the W&B run
            without_unset_settings(logger)
        return trainer

    def after_fit(self) -> None:
        """Say where the W&B run is kept; a teacher that exported its file is tested too."""
        from lightning.pytorch.loggers import WandbLogger

        for logger in self.trainer.loggers:
            run = getattr(logger, "_experiment", None)
            if isinstance(logger, WandbLogger) and run is not None and self.trainer.is_global_zero:
                folder = Path(run.dir).parent
                print(f"tnkd fit: W&B run kept in {folder} (upload it with: wandb sync {folder})")
        model = self.model
        if isinstance(model, TeacherModule) and model.hparams.get("export_path"):
            (metrics,) = self.trainer.test(model, datamodule=self.datamodule, verbose=False)
            if self.trainer.is_global_zero:
                print(
                    f"tnkd fit: teacher test accuracy {metrics['test/teacher_acc']:.4f}, "
                    f"saved with the teacher in {model.hparams['export_path']}"
                )

    def before_predict(self) -> None:
        """Write the predictions to a CSV file (``--predictions``, or one under runs/predictions)."""
        config = self.config["predict"]
        target = config.get("predictions")
        if not target:
            name = _run_name(config.get("trainer") or {}) or "predictions"
            target = unique_path(Path(self.trainer.default_root_dir, "predictions", f"{name}.csv"))
        self.prediction_writer = PredictionWriter(target)
        self.trainer.callbacks.append(self.prediction_writer)

    def after_predict(self) -> None:  # noqa: D102
        writer = self.prediction_writer
        if writer.rows:
            print(f"tnkd predict: {writer.rows} predictions written to {writer.path}")


def _logger_configs(logger: Any) -> list[Any]:
    if not logger or logger is True:
        return []
    return list(logger) if isinstance(logger, list) else [logger]


def _log_model_offline(trainer: Any) -> None:
    """Let an offline ``WandbLogger`` log checkpoints as artifacts (``log_model``).

    Lightning refuses ``offline=True`` with ``log_model`` (it cannot upload), but an offline W&B
    run records artifacts all the same and ``wandb sync`` uploads them with the run. Such a
    logger is made with ``offline=False`` and W&B's own ``mode="offline"``: the same offline run.
    """
    for logger in _logger_configs((trainer or {}).get("logger")):
        if not str(logger.get("class_path", "")).endswith("WandbLogger"):
            continue
        args = _init_args(logger)
        if args.get("offline") and args.get("log_model"):
            args["offline"] = False
            logger["dict_kwargs"] = {**(logger.get("dict_kwargs") or {}), "mode": "offline"}


def _init_args(config: Any) -> Any:
    """A class config's ``init_args`` (a jsonargparse Namespace or a dict; ``{}`` if none)."""
    args = config.get("init_args") if hasattr(config, "get") else None
    return args if hasattr(args, "get") else {}


def _run_name(trainer: Any) -> str | None:
    for logger in _logger_configs(trainer.get("logger")):
        name = _init_args(logger).get("name")
        if name:
            return str(name)
    return None


def _checkpoint_folder(config: Any) -> Path | None:
    """The folder RunCheckpoint will use for this config (see :func:`checkpoint_folder`)."""
    trainer = config.get("trainer") or {}
    for callback in _logger_configs(trainer.get("callbacks")):
        dirpath = _init_args(callback).get("dirpath")
        if dirpath:
            return Path(dirpath)
    loggers = _logger_configs(trainer.get("logger"))
    root = trainer.get("default_root_dir") or "runs"
    if not loggers:
        return checkpoint_folder(None, None, root)
    args = _init_args(loggers[0])
    return checkpoint_folder(args.get("name"), args.get("save_dir") or root, root)


#: hyperparameters a resumed run may change: they touch no weight and no optimiser state (the
#: teacher's weights are in the checkpoint: its file may have moved)
RESUMABLE_CHANGES = frozenset(
    {
        "teacher_checkpoint",
        "teacher_cache",
        "trust_teacher_file",
        "untrained_teacher",
        "export_path",
        "mixup_seed",
    }
)


def _comparable(value: Any) -> str:
    """A setting as text for comparison: Namespaces as dicts, whole numbers as floats."""
    import json

    def plain(v: Any) -> Any:
        if hasattr(v, "as_dict"):
            v = v.as_dict()
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        if isinstance(v, int) and not isinstance(v, bool):
            return float(v)
        return v

    return json.dumps(plain(value), default=str, sort_keys=True)


def _resolve(class_path: str) -> Any:
    """The class a class path names (the path itself if it cannot be imported)."""
    import importlib

    module, _, name = str(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return class_path


def check_same_settings(model: Any, checkpoint: dict[str, Any], path: Any) -> None:
    """Refuse, in one line listing them, to resume with settings other than the checkpoint's.

    ``model`` is the command's model config (``class_path`` and ``init_args``). Lightning
    replaces the config's model settings with the checkpoint's hyperparameters, and restores
    the optimiser's state (its learning rate too): a setting given on the command line would be
    silently ignored. The command refuses it instead.
    """
    saved = checkpoint.get("hyper_parameters") or {}
    given = _init_args(model) if model is not None else {}
    changed = []
    there_class = saved.get("_class_path")
    here_class = model.get("class_path") if hasattr(model, "get") else None
    if there_class and here_class and _resolve(there_class) != _resolve(here_class):
        changed.append(f"model {there_class} there, {here_class} here")
    for key in sorted(saved):
        if key.startswith("_") or key in RESUMABLE_CHANGES or key not in given:
            continue
        there, here = _comparable(saved[key]), _comparable(given[key])
        if there != here:
            changed.append(f"{key} {there} there, {here} here")
    if changed:
        raise ValueError(
            f"--ckpt_path {path} was trained with other settings ({'; '.join(changed)}); "
            "Lightning would silently use the checkpoint's: give the checkpoint's settings "
            "(its run's config), or train these settings as a new run under another name "
            "(--trainer.logger.init_args.name NEW)"
        )


def _refuse_untrained_teacher(config: Any) -> None:
    model = config.get("model") or {}
    args = _init_args(model)
    teacher = args.get("teacher")
    if (
        teacher is not None
        and hasattr(teacher, "get")
        and teacher.get("class_path")
        and not args.get("teacher_checkpoint")
        and (args.get("beta") is None or args.get("beta") > 0)
        and not args.get("untrained_teacher")
    ):
        raise ValueError(
            f"the teacher ({teacher.get('class_path')}) is given as an architecture without "
            "weights; give its weights with --model.init_args.teacher_checkpoint FILE (a tnkd "
            "teacher file, a state_dict or a Lightning checkpoint), or set "
            "--model.init_args.untrained_teacher true to distil from it untrained on purpose"
        )


USAGE = """usage: tnkd {fit,validate,test,predict,compare,grid,report,study,export} [--config FILE] [--help] [overrides]

  tnkd fit --config configs/digits/teacher_cnn.yaml       train a teacher (saves its file)
  tnkd fit --config configs/digits/mps_from_cnn.yaml      distil it into an MPS student
  tnkd compare --config configs/digits/main.yaml          teacher + students side by side, one table
  tnkd grid configs/mnist --plot P.png                    every grid*.yaml of a data set, one report
  tnkd report runs/results/digits_mps.json --plot P.png   tables + accuracy-vs-parameters plot
  tnkd study --config configs/digits/renyi_study.yaml     Renyi alpha x T x seeds: heatmaps, paired table
  tnkd export runs/checkpoints/NAME/last.ckpt NAME.onnx   the trained student as ONNX (or .pt2)
  tnkd fit --config FILE --print_config                   show the full resolved config
  tnkd fit --config FILE --model.init_args.temperature 2  override any setting
  tnkd fit --config FILE --divergence renyi --alpha 0.5   short flags: --divergence --alpha --skew
                                                          --temperature --beta --lr --bond_dim
                                                          --seed --epochs
  tnkd fit --config FILE --ckpt_path last                 resume a stopped run (same name)
  tnkd predict --config FILE --ckpt_path last --predictions P.csv   write predictions

Errors are one line; TNKD_DEBUG=1 shows the traceback.
"""


def run(args: list[str], from_argv: bool = False) -> Any:
    """Run a ``tnkd`` command; returns the ``LightningCLI`` (or ``compare``'s results)."""
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        if not args:
            return None
    if args and args[0] == "compare":
        from tnkd.experiments.compare import main as compare

        return compare(args[1:])
    if args and args[0] == "grid":
        from tnkd.experiments.grid import main as grid

        return grid(args[1:])
    if args and args[0] == "report":
        from tnkd.experiments.report import main as report

        return report(args[1:])
    if args and args[0] == "export":
        from tnkd.export import main as export

        return export(args[1:])
    if args and args[0] == "study":
        from tnkd.experiments.study import main as study

        return study(args[1:])
    # from the console script LightningCLI reads sys.argv itself (given both, it warns)
    return TnkdCLI(args=None if from_argv else args)


def _resume_command(argv: list[str], flags: dict[str, str] | None = None) -> str:
    """The command line that resumes a stopped command: the same, with ``flags`` set.

    ``tnkd fit``: ``--ckpt_path last``; ``tnkd compare``: its results file and W&B group.
    """
    flags = flags if flags is not None else {"--ckpt_path": "last"}
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in flags:
            skip = True
            continue
        if arg.split("=", 1)[0] in flags:
            continue
        out.append(arg)
    extra = [part for flag, value in flags.items() for part in (flag, value)]
    return shlex.join(["tnkd", *out, *extra])


def _stopped(argv: list[str], signum: int) -> None:
    name = signal.Signals(signum).name
    command = argv[0] if argv else ""
    flags = preemption.resume_flags()
    if command == "fit":
        hint = f"resume with: {_resume_command(argv)}"
    elif flags:
        hint = f"the runs that ended are kept; resume with: {_resume_command(argv, flags)}"
    else:
        hint = "rerun the same command to start it again"
    print(f"tnkd {command}: stopped by {name}; {hint}", file=sys.stderr, flush=True)
    raise SystemExit(preemption.EXIT_STATUS.get(signum, 128 + signum))


def _reader_gone() -> None:
    """Exit quietly when the reader of our output went away (``tnkd report ... | head``).

    Like a shell pipeline member killed by SIGPIPE: exit status 141, no message; stdout is pointed
    at ``os.devnull`` first so the interpreter's final flush does not raise again.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    raise SystemExit(128 + int(getattr(signal, "SIGPIPE", 13)))


#: warnings about Lightning's and torch's own internals, nothing a user can act on
INTERNAL_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",
    r".*``instantiate_classes`` was deprecated",
)


def _notices_to_stdout(warnings_too: bool) -> list[Any]:
    """Send Lightning's notices (devices, model summary, tips) to stdout; stderr is for errors.

    With ``warnings_too`` (every command but ``tnkd report``, whose stdout is its tables)
    Python warnings go there too. Warnings about Lightning's internals are
    silenced. An error during training is then the only line on stderr. Returns the handlers
    moved (for :func:`_notices_back`).
    """
    import logging
    import warnings

    for pattern in INTERNAL_WARNINGS:
        warnings.filterwarnings("ignore", pattern)
    moved = []
    if warnings_too:  # Lightning's advice on batch counts, workers...: a notice, not an error
        logging.captureWarnings(True)
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger("py.warnings").addHandler(handler)
        moved.append((handler, None))
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        for handler in logging.getLogger(name).handlers:
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and stream in (
                sys.stderr,
                sys.__stderr__,
            ):
                handler.setStream(sys.stdout)
                moved.append((handler, stream))
    return moved


def _notices_back(moved: list[Any]) -> None:
    import logging

    for handler, stream in moved:
        if stream is None:
            logging.getLogger("py.warnings").removeHandler(handler)
            logging.captureWarnings(False)
        else:
            handler.setStream(stream)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``tnkd`` console script (one-line errors, exit statuses; see above)."""
    argv = sys.argv[1:] if args is None else list(args)
    command = argv[0] if argv and not argv[0].startswith("-") else ""
    preemption.install()
    # tnkd report's stdout is its tables alone; the others' is a log (progress, notices)
    moved = _notices_to_stdout(warnings_too=command not in ("report", ""))
    # W&B's banner went to stderr, before any error; where the run is kept is on stdout (below)
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        run(argv, from_argv=args is None)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except SIGTERMException:
        _stopped(argv, preemption.stop_signal())
    except preemption.Preempted as stop:
        _stopped(argv, stop.signum)
    except KeyboardInterrupt:  # Ctrl-C outside a fit's training loop (compare, study, loading)
        _stopped(argv, signal.SIGINT)
    except SystemExit:
        raise
    except BrokenPipeError:
        _reader_gone()
    except BaseException as error:
        message = None if debug_enabled() else user_error_message(error)
        if message is None:
            raise
        print(f"tnkd {command}: error: {message}".replace("tnkd : ", "tnkd: "), file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        preemption.uninstall()
        _notices_back(moved)


if __name__ == "__main__":
    main()
