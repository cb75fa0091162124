"""The ``tnkd`` command: Lightning's CLI for single runs, plus ``tnkd compare`` for side-by-side tables.

* ``tnkd fit|validate|test|predict --config FILE`` is a :class:`lightning.pytorch.cli.LightningCLI`
  over any LightningModule (``tnkd.training.modules.TeacherModule``, ``tnkd.training.modules.DistillationModule``)
  and any tnkd data module, configured by ``class_path`` / ``init_args`` YAML. Runs log to
  Weights & Biases offline by default (``runs/wandb``; ``wandb sync`` uploads them later).
* ``tnkd compare --config FILE`` runs :func:`tnkd.experiments.compare.compare`.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from tnkd.data.base import ClassificationDataModule
from tnkd.experiments.files import unique_path
from tnkd.training.callbacks import RunCheckpoint

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.WandbLogger",
        "init_args": {"project": "tnkd", "save_dir": "runs", "offline": True},
    },
    "max_epochs": 30,
    # runs without a logger (``--trainer.logger false``) keep their files under runs/, not the cwd
    "default_root_dir": "runs",
}


def check_checkpoint_file(path: str | Path) -> None:
    """Fail early, in one line, on a checkpoint path that is missing, truncated or not a checkpoint.

    A torch checkpoint is a zip archive: its entries' CRCs are checked, nothing is loaded.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"checkpoint {file} does not exist; pass an existing .ckpt to --ckpt_path, or "
            "--ckpt_path last to resume the named run"
        )
    try:
        with zipfile.ZipFile(file) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        bad = str(err)
    if bad is not None:
        raise ValueError(
            f"checkpoint {file} is corrupt or not a checkpoint ({bad}); it was left as it is: pass "
            "another file to --ckpt_path (a run's checkpoints/last.ckpt), or retrain"
        )


class SaveConfigToRun(SaveConfigCallback):
    """Save the resolved config inside the run (W&B run files, or the logger's folder).

    Unlike Lightning's default it never overwrites another run's ``config.yaml`` and never stops
    a run because one exists: each run's config goes to its own folder (or a numbered name).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:  # noqa: D102
        text = self.parser.dump(self.config, skip_none=False)
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                Path(logger.experiment.dir, "config.yaml").write_text(text)
                logger.experiment.config.update({"cli_config": text}, allow_val_change=True)
                return
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        unique_path(folder / "config.yaml").write_text(text)


class TnkdCLI(LightningCLI):
    """LightningCLI with tnkd's defaults (W&B offline logger, seeded runs, safe config saving)."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
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
        )

    def _check_ckpt_path(self) -> None:
        path = self.config[self.subcommand].get("ckpt_path")
        if path and path not in ("last", "best", "hpc", "registry"):
            check_checkpoint_file(path)

    before_fit = before_validate = before_test = before_predict = _check_ckpt_path

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Add a :class:`~tnkd.training.callbacks.RunCheckpoint` unless the config names a checkpoint."""
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
        return super().instantiate_trainer(**kwargs)


USAGE = """usage: tnkd {fit,validate,test,predict,compare,grid,report} [--config FILE] [--help] [overrides]

  tnkd fit --config configs/digits/teacher_cnn.yaml       train a teacher (saves its file)
  tnkd fit --config configs/digits/mps_from_cnn.yaml      distil it into an MPS student
  tnkd compare --config configs/digits/main.yaml          teacher + students side by side, one table
  tnkd grid configs/mnist --plot P.png                    every grid*.yaml of a data set, one report
  tnkd report runs/results/digits_mps.json --plot P.png   tables + accuracy-vs-parameters plot
  tnkd fit --config FILE --print_config                   show the full resolved config
  tnkd fit --config FILE --model.init_args.temperature 2  override any setting
  tnkd fit --config FILE --ckpt_path last                 resume a stopped run (same name)
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
    # from the console script LightningCLI reads sys.argv itself (given both, it warns)
    return TnkdCLI(args=None if from_argv else args)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``tnkd`` console script."""
    if args is None:
        run(sys.argv[1:], from_argv=True)
    else:
        run(list(args))


if __name__ == "__main__":
    main()
