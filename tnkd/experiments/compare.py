"""Side-by-side comparisons: one teacher, one student family, several ways to train the student.

``tnkd compare --config configs/digits/main.yaml`` runs :func:`compare`: it trains the teacher on
first use (and reuses its file after), trains the same student on labels alone and distilled with
each divergence / temperature / beta asked for, over one or more seeds, and prints a results
table (test accuracy, teacher-student agreement, calibration, parameters, compression, time).

Nothing finished is lost: each run's result is written to the results file as soon as the run
ends; a run whose student's logits or loss become NaN or infinite is recorded as failed (its
name, seed, setting, epoch and step; ``status: failed`` in the file, named under the table) and
the others go on (with ``batched``, the diverged member is frozen and the rest train on); a
SIGTERM keeps the runs that ended, and the command it prints (the same, with ``--results FILE
--group G``) runs only the missing ones. ``tnkd compare`` exits with status 2 and one line naming
the failed runs if any run failed.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import lightning as L
from torch import nn

import tnkd.training.preemption as preemption
from tnkd.data.base import ClassificationDataModule
from tnkd.errors import is_disk_full, note_output
from tnkd.experiments.progress import EpochLines
from tnkd.experiments.results_file import ResultsFile, results_target
from tnkd.experiments.wandb_runs import finish_run, make_logger
from tnkd.students.base import count_parameters
from tnkd.training.modules import DistillationModule, Diverged, TeacherModule
from tnkd.training.outputs import check_writable, discard_wandb_run
from tnkd.training.teacher_source import TeacherSource


@dataclass
class Variant:
    """One way to train the student.

    Args:
        name: label in the table ("labels only", "KL", "Renyi a=2"...).
        beta: weight of the distillation term (0 = labels only).
        divergence: divergence name or mapping (see :mod:`tnkd.divergences`).
        temperature: distillation temperature T.
    """

    name: str
    beta: float = 0.9
    divergence: str | dict = "kl"
    temperature: float = 4.0


def default_variants() -> list[Variant]:
    """Labels alone vs Hinton's KL distillation."""
    return [Variant("labels only", beta=0.0), Variant("KL", divergence="kl")]


@dataclass
class RunResult:
    """What one run measured on the test set."""

    name: str
    seed: int
    divergence: str
    temperature: float
    beta: float
    student_acc: float
    agreement: float
    student_ece: float
    student_params: int
    compression_ratio: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    #: ``"finished"``, or ``"failed"`` (a diverged run: its metrics are NaN, ``extra["failure"]``
    #: says where it diverged)
    status: str = "finished"

    @property
    def failed(self) -> bool:
        """Whether the run failed (diverged) instead of finishing."""
        return self.status == "failed"

    def label(self) -> str:
        """``KL seed 1 (divergence kl, T 4, beta 0.9)``: the run and its setting, for messages."""
        setting = (
            f"beta {self.beta:g}"
            if self.beta == 0
            else (f"divergence {self.divergence}, T {self.temperature:g}, beta {self.beta:g}")
        )
        return f"{self.name} seed {self.seed} ({setting})"


def _trainer(
    max_epochs: int,
    logger: Any,
    trainer: dict[str, Any] | None,
    label: str | None = None,
    eta: bool = False,
) -> L.Trainer:
    kwargs: dict[str, Any] = {
        "max_epochs": max_epochs,
        "logger": logger,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "enable_progress_bar": False,
        "deterministic": "warn",
        "log_every_n_steps": 1,
    }
    kwargs.update(trainer or {})
    if label is not None:
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), EpochLines(label, eta=eta)]
    return L.Trainer(**kwargs)


def test_metrics(trainer: L.Trainer, module: L.LightningModule, data: Any) -> dict[str, float]:
    """Lightning's test loop on ``module``: the logged ``test/*`` values as floats."""
    (metrics,) = trainer.test(module, datamodule=data, verbose=False)
    return {k: float(v) for k, v in metrics.items()}


def validation_metrics(
    trainer: L.Trainer, module: L.LightningModule, data: Any
) -> dict[str, float]:
    """Lightning's validation loop on the trained ``module``, renamed ``test/*`` for the table.

    For screening recipes on the validation split (``evaluate="val"``) without reading the test
    set.
    """
    (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
    return {"test/" + k.removeprefix("val/"): float(v) for k, v in metrics.items()}


def compare(
    data: ClassificationDataModule,
    student: Callable[[], nn.Module],
    teacher: Callable[[], nn.Module],
    teacher_checkpoint: str | list[str] = "runs/teachers/teacher.pt",
    teacher_epochs: int = 30,
    teacher_lr: float = 2e-3,
    variants: Sequence[Variant] | None = None,
    epochs: int = 30,
    lr: float = 2e-3,
    seeds: Sequence[int] = (0,),
    scheduler: str = "cosine",
    weight_decay: float = 0.0,
    teacher_cache: str | None = None,
    trainer: dict[str, Any] | None = None,
    logger: str = "wandb",
    project: str = "tnkd",
    group: str | None = None,
    save_dir: str = "runs",
    results: str | None = None,
    progress: bool = False,
    evaluate: str = "test",
    batched: bool = False,
    mixup: float = 0.0,
) -> list[RunResult]:
    """Train one student family several ways against one teacher; print and return the results.

    Args:
        data: the data module.
        student: a factory of fresh students (in YAML: ``class_path`` + ``init_args``).
        teacher: a factory of the teacher architecture.
        teacher_checkpoint: the teacher file: trained on first use, reused after. A list of
            existing files is a teacher ensemble (their probabilities averaged at each variant's
            temperature; see :class:`~tnkd.teachers.TeacherEnsemble`). With a transfer set
            (``labeled_per_class``) the teacher file must exist: it stands for a teacher
            trained on all labels.
        teacher_epochs: epochs of the teacher's training (first use only).
        teacher_lr: learning rate of the teacher's training.
        variants: the ways to train the student (default: labels only, and KL).
        epochs: student epochs per run.
        lr: student learning rate.
        seeds: one run per seed and variant: the seed of initialisation, dropout and the other
            random draws (the batch order is the data module's own ``seed``, fixed for resumes).
        scheduler: student learning-rate schedule, ``"cosine"`` or ``"none"`` (constant).
        weight_decay: AdamW weight decay of the student (0: plain Adam).
        teacher_cache: folder for the teacher's logits on the training and validation sets,
            computed once and reused by every distilled run (see :mod:`tnkd.training.teacher_cache`);
            ``None``: run the teacher on every batch.
        trainer: extra ``lightning.Trainer`` arguments (``accelerator``, ``precision``...).
        logger: ``"wandb"`` (offline: sync later with ``wandb sync``) or ``"none"``.
        project: W&B project.
        group: W&B group shared by the runs of this comparison.
        save_dir: where W&B runs go.
        results: path of a JSON file for the results, rewritten as each run ends (see
            :mod:`tnkd.experiments.results_file`): a file of a stopped comparison with these
            settings is resumed (its runs kept, the missing ones run), a complete one is never
            overwritten (a numbered name is chosen). ``tnkd compare`` without it writes
            ``SAVE_DIR/results/GROUP.json``; the Python function then writes no file.
        progress: print one line per epoch of each run (train loss and accuracy, validation
            accuracy, seconds); off by default, so the output is the results table alone.
        evaluate: ``"test"`` (default): each trained run is tested on the test set;
            ``"val"``: on the validation split instead, for choosing a recipe without reading
            the test set (the table and results then hold validation figures, and say so).
        batched: train all runs together as one batched model (one process, one loop; see
            :mod:`tnkd.experiments.batched`): each run keeps its initialisation, loss, results
            row and W&B run, and follows its separate run's optimisation up to rounding; the
            time per run is then its share of the batched fit time.
        mixup: mixup's alpha for every run (``DistillationModule(mixup=...)``; 0: off): the
            labels-only runs mix images and labels, the distilled runs' teacher labels the mixed
            images (it then runs on every training batch).

    Returns:
        One :class:`RunResult` per run.
    """
    setup = _Setup(**locals())  # the arguments, checked
    started = time.perf_counter()
    _quiet()
    setup.check_outputs()
    journal = setup.open_results()
    try:
        return _run_all(setup, journal, started)
    finally:
        if journal is not None:
            journal.lock.release()


def default_group(data: Any) -> str:
    """The W&B group of a comparison given none: the data module's name and the time."""
    return f"{type(data).__name__}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass
class _Setup:
    """:func:`compare`'s arguments (see there), checked, and what its runs are built from."""

    data: ClassificationDataModule
    student: Callable[[], nn.Module]
    teacher: Callable[[], nn.Module]
    teacher_checkpoint: str | list[str]
    teacher_epochs: int
    teacher_lr: float
    variants: Sequence[Variant] | None
    epochs: int
    lr: float
    seeds: Sequence[int]
    scheduler: str
    weight_decay: float
    teacher_cache: str | None
    trainer: dict[str, Any] | None
    logger: str
    project: str
    group: str | None
    save_dir: str
    results: str | None
    progress: bool
    evaluate: str
    batched: bool
    mixup: float

    def __post_init__(self) -> None:
        if self.evaluate not in ("test", "val"):
            raise ValueError(f"evaluate must be 'test' or 'val', but got {self.evaluate!r}")
        self.variants = list(self.variants) if self.variants is not None else default_variants()
        self.seeds = list(self.seeds)
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one seed (e.g. --seeds '[0]')")
        if not self.variants:
            raise ValueError(
                "variants is empty: give at least one way to train the student (e.g. --variants "
                "'[{name: labels only, beta: 0.0}]'), or leave it out for labels only and KL"
            )
        if self.batched and self.mixup:
            raise ValueError("mixup runs cannot be batched yet: leave out --batched or --mixup")
        self.group = self.group or default_group(self.data)

    @property
    def source(self) -> TeacherSource:
        """Where the teacher comes from (trained into ``teacher_checkpoint`` on first use)."""
        return TeacherSource(self.teacher_checkpoint, self.teacher, cache=self.teacher_cache)

    def check_outputs(self) -> None:
        """Every file and folder the comparison will write, checked before anything is trained."""
        self.source.check_outputs()
        if self.logger == "wandb":
            check_writable(self.save_dir, "--save_dir")
        if self.results:
            check_writable(self.results, "--results", folder=False)
        for output in (self.save_dir, self.results, self.teacher_cache):
            if output:
                note_output(output)

    def open_results(self) -> ResultsFile | None:
        """The results file, locked (a stopped comparison's is resumed), or ``None`` for none."""
        if not self.results:
            return None
        journal = ResultsFile(results_target(self.results), self.resume_settings())
        journal.lock.acquire()
        preemption.resume_with({"--results": str(journal.path), "--group": self.group})
        return journal

    def resume_settings(self) -> dict[str, Any]:
        """What the runs depend on, to refuse resuming a results file made otherwise."""
        made = self.student()
        names = ("epochs", "lr", "scheduler", "weight_decay", "teacher_cache", "evaluate")
        return {
            "data": f"{type(self.data).__name__}({getattr(self.data, 'hparams', {})})",
            "student": f"{type(made).__module__}.{type(made).__qualname__}"
            f"({getattr(made, 'init_args', '')})",
            "teacher_checkpoint": self.teacher_checkpoint,
            "variants": [asdict(v) for v in self.variants],  # type: ignore[union-attr]
            "seeds": self.seeds,
            **{name: getattr(self, name) for name in (*names, "batched", "mixup")},
        }

    def module(self, variant: Variant, teacher: nn.Module | list[nn.Module]) -> DistillationModule:
        """A run's module (build it after seeding): a fresh student, distilled as ``variant`` says.

        Labels-only runs keep the teacher for the test metrics (agreement) only; a list of
        teachers is an ensemble at the variant's temperature.
        """
        run = {key: getattr(variant, key) for key in ("divergence", "temperature", "beta")}
        shared = ("lr", "weight_decay", "scheduler", "teacher_cache", "mixup")
        run |= {key: getattr(self, key) for key in shared}
        module = DistillationModule(self.student(), teacher=teacher, **run)
        module.hparams["teacher_checkpoint"] = self.teacher_checkpoint  # for the run's config
        return module


def _run_all(setup: _Setup, journal: ResultsFile | None, started: float) -> list[RunResult]:
    """The teacher, then the runs not yet in the results file, then the table."""
    setup.data.setup("fit")
    source = setup.source
    teacher_net, trained_now = _teachers(setup, source)
    nets = teacher_net if isinstance(teacher_net, list) else [teacher_net]
    teacher_info = {"class_path": source.class_path(), "params": sum(map(count_parameters, nets))}
    runs, out, todo = _plan(setup, journal)

    def ended(result: RunResult) -> None:  # each result is in the file as soon as its run ends
        out.append(result)
        if journal is not None:
            journal.add(result, {**teacher_info, "test_acc": result.extra.get("teacher_acc")})

    if setup.batched and todo:
        for result in _run_batched(setup, runs, todo, teacher_net):
            ended(result)
    for seed, variant in todo if not setup.batched else ():
        number = runs.index((seed, variant)) + 1
        ended(_run_one(setup, number, len(runs), seed, variant, teacher_net))
    return _report(setup, runs, out, teacher_info, trained_now, started, journal)


def _teachers(setup: _Setup, source: TeacherSource) -> tuple[nn.Module | list[nn.Module], bool]:
    """The trained teacher (or an ensemble's members), and whether it was trained now.

    A single teacher file is trained on first use (:func:`_train_teacher`); an ensemble's files,
    and the teacher of a transfer set, must exist.
    """
    missing = source.missing()
    several = len(source.files) > 1
    if missing and (several or getattr(setup.data, "is_transfer_set", False)):
        what = "an ensemble's teacher files" if several else "a transfer set's teacher"
        verb, them = ("does", "it") if len(missing) == 1 else ("do", "them")
        raise FileNotFoundError(
            f"{what} must exist before the comparison ({', '.join(missing)} {verb} not exist): "
            f"train {them} on all labels first with tnkd fit (e.g. tnkd fit --config "
            "configs/mnist/teacher_cnn.yaml --model.init_args.export_path FILE)"
        )
    if source.is_ensemble:
        return source.members(), False
    if missing:
        _train_teacher(setup)
    return source.load(), bool(missing)


def _train_teacher(setup: _Setup) -> None:
    """Train, test and save the teacher file; a line per epoch with the time left.

    The file records the teacher's test accuracy (``test/teacher_acc``).
    """
    path = setup.teacher_checkpoint
    epochs = setup.teacher_epochs
    print(
        f"tnkd compare: training the teacher ({epochs} epochs) -> {path}; later runs reuse it",
        flush=True,
    )
    L.seed_everything(setup.seeds[0], verbose=False)
    module = TeacherModule(setup.teacher(), lr=setup.teacher_lr, export_path=path)
    log = make_logger(
        setup.logger, setup.save_dir, setup.project, "teacher", setup.group, job_type="teacher"
    )
    try:
        run = _trainer(epochs, log, setup.trainer, label="teacher", eta=True)
        run.fit(module, datamodule=setup.data)
        run.test(module, datamodule=setup.data, verbose=False)
    finally:
        finish_run(log)


def _plan(
    setup: _Setup, journal: ResultsFile | None
) -> tuple[list[tuple[int, Variant]], list[RunResult], list[tuple[int, Variant]]]:
    """Every ``(seed, variant)`` run, the results kept from a resumed file, the runs to do."""
    runs = [(seed, variant) for seed in setup.seeds for variant in setup.variants]  # type: ignore[union-attr]
    kept = [_from_record(r) for r in journal.runs] if journal is not None else []
    done = {(r.name, r.seed) for r in kept}
    todo = [(seed, v) for seed, v in runs if (v.name, seed) not in done]
    if kept:
        print(
            f"tnkd compare: resuming {journal.path}: {len(kept)} of {len(runs)} runs kept, "  # type: ignore[union-attr]
            f"{len(todo)} to run",
            flush=True,
        )
    return runs, kept, todo


def _run_one(
    setup: _Setup,
    number: int,
    total: int,
    seed: int,
    variant: Variant,
    teacher_net: nn.Module | list[nn.Module],
) -> RunResult:
    """One run in its own Lightning loop and W&B run; a run that diverged is a failed result."""
    label = f"{variant.name} seed {seed}"
    print(f"tnkd compare: run {number}/{total}: {label}", flush=True)
    L.seed_everything(seed, verbose=False)
    module = setup.module(variant, copy.deepcopy(teacher_net))
    log = make_logger(
        setup.logger, setup.save_dir, setup.project, label, setup.group, tags=[variant.name]
    )
    failed = False
    try:
        run = _trainer(setup.epochs, log, setup.trainer, label if setup.progress else None)
        run.fit(module, datamodule=setup.data)
        evaluation = validation_metrics if setup.evaluate == "val" else test_metrics
        return _result(variant, seed, module, evaluation(run, module, setup.data))
    except Diverged as failure:  # recorded as failed; the other runs go on
        failed = True
        result = _result(variant, seed, module, None, failure)
        _say_failed(number, total, result, "stopped")
        return result
    except BaseException as error:
        if is_disk_full(error):  # no W&B run is left of a run that could not be written
            discard_wandb_run()
        raise
    finally:
        finish_run(log, failed)


def _run_batched(
    setup: _Setup,
    runs: list[tuple[int, Variant]],
    todo: list[tuple[int, Variant]],
    teacher_net: nn.Module | list[nn.Module],
) -> list[RunResult]:
    """The runs to do as one batched model (:mod:`tnkd.experiments.batched`), a result each."""
    from tnkd.experiments.batched import batched_runs

    fitted = batched_runs(
        setup.data,
        todo,
        lambda variant: setup.module(variant, teacher_net),  # one frozen teacher for all
        lambda label: _trainer(setup.epochs, False, setup.trainer, label),
        setup.evaluate,
        setup.logger,
        {"project": setup.project, "group": setup.group, "save_dir": setup.save_dir},
        setup.progress,
    )
    out = []
    for (seed, variant), (module, metrics, failure) in zip(todo, fitted, strict=True):
        if failure is None:
            result = _result(variant, seed, module, metrics)
        else:
            result = _result(variant, seed, module, None, failure)
            _say_failed(runs.index((seed, variant)) + 1, len(runs), result, "frozen")
        result.extra |= {"batched_members": len(todo)}
        result.extra["batched_fit_seconds"] = result.seconds * len(todo)
        out.append(result)
    return out


def _report(
    setup: _Setup,
    runs: list[tuple[int, Variant]],
    out: list[RunResult],
    teacher_info: dict[str, Any],
    trained_now: bool,
    started: float,
    journal: ResultsFile | None,
) -> list[RunResult]:
    """The results in the runs' order: printed as a table and written as complete."""
    order = {(v.name, seed): k for k, (seed, v) in enumerate(runs)}
    out.sort(key=lambda r: order.get((r.name, r.seed), len(order)))
    finished = [r for r in out if not r.failed]
    teacher_acc = finished[0].extra["teacher_acc"] if finished else math.nan
    table = format_table(
        out,
        teacher_acc,
        teacher_info["params"],
        type(setup.data).__name__,
        time.perf_counter() - started,
        teacher_note="trained now" if trained_now else f"from {setup.teacher_checkpoint}",
    )
    if setup.evaluate == "val":
        table = table.replace(": teacher test accuracy", ": VALIDATION split, teacher accuracy")
        table = table.replace("| test acc |", "| val acc |", 1)
        for r in out:
            r.extra["split"] = "val"
    print(table, flush=True)
    if journal is not None:
        journal.teacher = {**teacher_info, "test_acc": teacher_acc}
        journal.write(complete=True, runs=[_record(r) for r in out])
    return out


def _say_failed(number: int, total: int, result: RunResult, what: str) -> None:
    print(
        f"tnkd compare: run {number}/{total} FAILED ({what}): {result.label()}: "
        f"{result.extra['failure']}; the other runs go on",
        flush=True,
    )


def _record(result: RunResult) -> dict[str, Any]:
    from tnkd.experiments.results_file import _json_value

    return _json_value(asdict(result))


def _from_record(record: dict[str, Any]) -> RunResult:
    """A :class:`RunResult` from its results-file record (null metrics back to NaN)."""
    names = {f.name for f in fields(RunResult)}
    values = {k: v for k, v in record.items() if k in names}
    for key in ("student_acc", "agreement", "student_ece", "compression_ratio", "seconds"):
        if values.get(key) is None:
            values[key] = math.nan
    return RunResult(**values)


def _quiet() -> None:
    """Keep the results table readable: no per-run banners from W&B and Lightning."""
    import logging
    import os
    import warnings

    os.environ.setdefault("WANDB_SILENT", "true")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for pattern in (
        ".*does not have many workers.*",
        ".*LeafSpec.*",
        ".*is smaller than the logging interval.*",
        r".*module\(s\) in eval mode.*",
    ):
        warnings.filterwarnings("ignore", pattern)


def _result(
    variant: Variant,
    seed: int,
    module: DistillationModule,
    metrics: dict[str, float] | None,
    failure: Diverged | None = None,
) -> RunResult:
    """A results row from the values the run's test loop logged (the W&B summary's values).

    Without ``metrics`` (a run that diverged, ``failure`` says where) the metrics are NaN.
    """
    sizes = module.size_summary()
    nan = math.nan
    return RunResult(
        name=variant.name,
        seed=seed,
        divergence=_div_name(variant),
        temperature=variant.temperature,
        beta=variant.beta,
        student_acc=nan if metrics is None else metrics["test/student_acc"],
        agreement=nan if metrics is None else metrics["test/agreement"],
        student_ece=nan if metrics is None else metrics["test/student_ece"],
        student_params=int(sizes["student_params"]),
        compression_ratio=float(sizes.get("compression_ratio", nan)),
        seconds=float(module.fit_seconds or 0.0),
        extra=(
            {"failure": failure.short}
            if metrics is None
            else {"teacher_acc": metrics["test/teacher_acc"]}
        ),
        status="failed" if metrics is None else "finished",
    )


def _div_name(v: Variant) -> str:
    if v.beta == 0:
        return "-"
    if isinstance(v.divergence, dict):
        extra = ", ".join(f"{k}={val}" for k, val in v.divergence.items() if k != "name")
        return f"{v.divergence.get('name')}({extra})" if extra else str(v.divergence.get("name"))
    return str(v.divergence)


def _mean_sd(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def format_table(
    results: list[RunResult],
    teacher_acc: float,
    teacher_params: int,
    data_name: str,
    seconds: float,
    teacher_note: str = "",
) -> str:
    """A markdown table: one row per variant (mean ± sd over seeds) after the teacher's row.

    Failed runs (diverged) are left out of the means and named under the table; a variant
    whose every run failed shows ``failed`` in its cells.
    """
    teacher = "n/a" if teacher_acc is None or math.isnan(teacher_acc) else f"{teacher_acc:.4f}"
    lines = [
        f"## {data_name}: teacher test accuracy {teacher} ({teacher_params:,} parameters, {teacher_note})",
        "",
        "| student run | divergence | T | beta | test acc | agreement | ECE | params | compression | time/run |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = list(dict.fromkeys(r.name for r in results))
    for name in names:
        every = [r for r in results if r.name == name]
        rows = [r for r in every if not r.failed]
        r0 = every[0]
        lost = len(every) - len(rows)
        if rows:
            note = f" ({lost} of {len(every)} failed)" if lost else ""
            acc = _mean_sd([r.student_acc for r in rows]) + note
            agreement = _mean_sd([r.agreement for r in rows])
            ece = _mean_sd([r.student_ece for r in rows], 3)
        else:
            acc, agreement, ece = f"failed ({lost} of {lost})", "failed", "failed"
        ratio = r0.compression_ratio
        lines.append(
            f"| {name} | {r0.divergence} | {'-' if r0.beta == 0 else f'{r0.temperature:g}'} | {r0.beta:g} | "
            f"{acc} | {agreement} | {ece} | {r0.student_params:,} | "
            f"{'-' if math.isnan(ratio) else f'{ratio:.1f}x'} | "
            f"{statistics.mean(r.seconds for r in every):.1f} s |"
        )
    seeds = sorted({r.seed for r in results})
    lines += ["", f"seeds {seeds}; total wall time {seconds:.1f} s"]
    failed = [r for r in results if r.failed]
    if failed:
        lines.append("FAILED (left out of the means):")
        lines += [f"- {r.label()}: {r.extra.get('failure', 'failed')}" for r in failed]
    return "\n".join(lines)


class RunsFailed(ValueError):
    """Some runs of a comparison failed (diverged); the others' results were kept."""


# :func:`compare` as ``tnkd compare`` runs it (its signature and docs, for the parser): the
# results always go to a file (``SAVE_DIR/results/GROUP.json`` without ``results``), so that the
# runs that ended survive a stop or a failed run; a run that failed makes the command fail with
# one line naming every failed run and the file, after the others' results were written.
@functools.wraps(compare)
def compare_command(*args: Any, **kwargs: Any) -> list[RunResult]:  # noqa: D103
    bound = inspect.signature(compare).bind(*args, **kwargs)
    bound.apply_defaults()
    call = bound.arguments
    call["group"] = call["group"] or default_group(call["data"])
    if not call["results"]:
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in call["group"])
        call["results"] = str(Path(call["save_dir"], "results", f"{name}.json"))
    out = compare(**call)
    failed = [r for r in out if r.failed]
    if failed:
        target = preemption.resume_flags().get("--results", call["results"])
        raise RunsFailed(
            f"{len(failed)} of {len(out)} runs failed, the others' results are in {target}: "
            + "; ".join(f"{r.label()}: {r.extra.get('failure', 'failed')}" for r in failed)
        )
    return out


def main(args: list[str]) -> list[RunResult]:
    """``tnkd compare``: :func:`compare_command` configured from YAML (``--config``) and flags."""
    from tnkd.experiments.command import function_command

    return function_command(
        compare_command, args, "tnkd compare", "Teacher and students side by side."
    )
