"""Inference cost of the teacher and its students: PyTorch and ONNX Runtime, one thread and all cores.

    python benchmarks/inference.py                       # the MNIST CNN against two MPS students
    python benchmarks/inference.py --rounds 9 --batches 1 16 256
    python benchmarks/inference.py --checkpoint runs/checkpoints/NAME/last.ckpt   # trained ones

Models (eval mode; untrained weights by default, since the cost does not depend on the values):

* **teacher**: ``tnkd.teachers.CNN`` with the arguments of ``configs/mnist/teacher_cnn.yaml``
  (468,202 parameters);
* **patch MPS**: the student of ``configs/mnist/compare_small_tn_hinton.yaml`` (49 sites over 4 x 4
  patches, learnable map of dimension 8, D = 8; 25,864 parameters);
* **pooled MPS**: 196 sites after 2 x 2 pooling, [1, x] map, D = 8.

``--checkpoint CKPT`` (repeatable) adds the trained student of a run's checkpoint, and its
teacher replaces the default one when the checkpoint holds one (a run on other images than
MNIST's, digits say, replaces the default models: the images are random of the run's shape).

Engines, for each model, batch size and thread setting:

* **torch**: the model as trained (its fast engines: native kernels where built), ``no_grad``;
* **torch portable**: :func:`tnkd.export.portable`, the copy that ``tnkd export`` captures (tensor
  operations only); the teacher has no other engine, so its row is the same network;
* **ORT**: the ``.onnx`` file that :func:`tnkd.export.save` writes, in an ONNX Runtime session
  with ``intra_op_num_threads`` 1 (one thread) or the machine's core count (all cores);
  ``torch.set_num_threads`` is set the same way for the PyTorch engines.

Each figure is the median over ``--rounds`` rounds of the time per call (a block of calls of
at least ``--block`` seconds); in every round each engine of each model runs once, in turn, so
that load from other processes falls on all alike. Throughput is batch / latency.

Multiply-adds per sample are counted from the captured program (``torch.export`` at batch 1,
decomposed to core ATen operators): ``mm``, ``addmm``, ``bmm`` (einsums become these) and
``convolution`` (output elements x input channels per group x kernel size); element-wise
operations (feature maps, activations, rescaling, pooling) are not counted.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tnkd.export import portable, save
from tnkd.students import MPSClassifier
from tnkd.teachers import CNN
from tnkd.training.checkpoints import load_student

CORES = os.cpu_count() or 1


def default_models() -> dict[str, nn.Module]:
    """The MNIST CNN teacher and the two MPS students of the docs page."""
    torch.manual_seed(0)
    return {
        "CNN teacher": CNN((1, 28, 28), 10, channels=(32, 64), hidden=128, dropout=0.25),
        "patch MPS": MPSClassifier(
            49, 10, bond_dim=8, patch=4,
            feature_map={"name": "learnable", "dim": 8, "in_features": 16},
        ),
        "pooled MPS": MPSClassifier(196, 10, bond_dim=8, pool=2),
    }


def checkpoint_models(path: str) -> dict[str, nn.Module]:
    """The trained student of a checkpoint, and its teacher when it holds one."""
    from tnkd.training.checkpoints import KEY, read_checkpoint, rebuilt

    name = Path(path).parent.name or Path(path).stem
    models = {f"{name} student": load_student(path)}
    checkpoint = read_checkpoint(path)
    if ((checkpoint.get(KEY) or {}).get("teacher") or {}).get("spec"):
        teacher = rebuilt(checkpoint, "teacher", path)
        state = {
            k[len("teacher."):]: v
            for k, v in checkpoint["state_dict"].items()
            if k.startswith("teacher.")
        }
        if isinstance(teacher, nn.Module) and state:
            teacher.load_state_dict(state)
            models["teacher"] = teacher
    return models


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-adds of one call on ``example``: matrix products and convolutions of the program."""
    aten = torch.ops.aten
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        planned = torch.backends.opt_einsum.enabled
        torch.backends.opt_einsum.enabled = False
        try:
            with torch.no_grad():
                program = torch.export.export(portable(model), (example,), strict=False)
            program = program.run_decompositions()
        finally:
            torch.backends.opt_einsum.enabled = planned
    total = 0
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target not in (aten.mm.default, aten.bmm.default, aten.addmm.default,
                               aten.convolution.default):
            continue
        shapes = [a.meta["val"].shape for a in node.args if isinstance(a, torch.fx.Node)]
        out = node.meta["val"].shape
        if node.target in (aten.mm.default, aten.bmm.default):
            total += math.prod(out) * shapes[0][-1]
        elif node.target == aten.addmm.default:
            total += math.prod(out) * shapes[1][-1]
        elif node.target == aten.convolution.default:
            total += math.prod(out) * math.prod(shapes[1][1:])
    return int(total)


class Engines:
    """Callables ``batch -> logits`` of one model: PyTorch, its portable copy, ONNX Runtime."""

    def __init__(self, model: nn.Module, example: torch.Tensor, folder: Path, name: str) -> None:
        import onnxruntime

        self.model = model.eval()
        self.portable = portable(model)
        self.file = save(model, folder / f"{name.replace(' ', '_')}.onnx", example)
        self.sessions = {}
        for threads in (1, CORES):
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            self.sessions[threads] = onnxruntime.InferenceSession(
                str(self.file), options, providers=["CPUExecutionProvider"]
            )
        self.input = self.sessions[1].get_inputs()[0].name

    def calls(self, threads: int) -> dict[str, Any]:
        session = self.sessions[threads]
        return {
            "torch": self.model,
            "torch portable": self.portable,
            "ORT": lambda x: session.run(None, {self.input: x.numpy()})[0],
        }


def time_call(call: Any, x: torch.Tensor, block: float) -> float:
    """Seconds per call, from a block of calls lasting at least ``block`` seconds."""
    calls, start = 0, time.perf_counter()
    while True:
        call(x)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= block:
            return elapsed / calls


def measure(
    engines: dict[str, Engines], shape: tuple[int, ...], batches: list[int], rounds: int, block: float
) -> dict[tuple[str, str, int, int], float]:
    """Median seconds per call for every (model, engine, threads, batch), rounds interleaved."""
    times: dict[tuple[str, str, int, int], list[float]] = {}
    for threads in (1, CORES):
        torch.set_num_threads(threads)
        for batch in batches:
            x = torch.rand(batch, *shape)
            with torch.no_grad():
                for model in engines.values():  # warm-up (plans, sessions, caches)
                    for call in model.calls(threads).values():
                        call(x)
                for _ in range(rounds):
                    for name, model in engines.items():
                        for engine, call in model.calls(threads).items():
                            key = (name, engine, threads, batch)
                            times.setdefault(key, []).append(time_call(call, x, block))
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    """Measure and print the tables (markdown)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--block", type=float, default=0.05, help="seconds per timed block")
    parser.add_argument("--checkpoint", action="append", default=[],
                        help="a run's checkpoint: its trained student (and teacher) join")
    args = parser.parse_args()
    models = default_models()
    shape = (1, 28, 28)
    for path in args.checkpoint:
        student = load_student(path)
        wanted = tuple(getattr(student, "input_shape", None) or (student.num_inputs,))
        if math.prod(wanted) != math.prod(shape):  # not MNIST's images
            shape, models = wanted, {}
        trained = checkpoint_models(path)
        if "teacher" in trained:  # the first model is the one the students are compared with
            teacher = trained.pop("teacher")
            models.pop("CNN teacher", None)
            models = {f"{type(teacher).__name__} teacher (trained)": teacher, **models}
        models |= trained
    example = torch.rand(2, *shape)
    with tempfile.TemporaryDirectory() as folder:
        engines = {name: Engines(m, example, Path(folder), name) for name, m in models.items()}
        sizes = {name: e.file.stat().st_size for name, e in engines.items()}
    macs = {name: count_macs(m, example[:1]) for name, m in models.items()}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    print(f"cores: {CORES}; load average (1, 5, 15 min): {os.getloadavg()}")
    print(f"rounds: {args.rounds}, block: {args.block} s; torch {torch.__version__}")
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}\n")
    print("| model | parameters | ONNX file | multiply-adds per sample |")
    print("|---|---:|---:|---:|")
    for name in models:
        print(f"| {name} | {params[name]:,} | {sizes[name] / 1024:.1f} KiB | {macs[name]:,} |")
    result = measure(engines, shape, args.batches, args.rounds, args.block)
    teacher = next((name for name in models if "teacher" in name), None)
    for threads in (1, CORES):
        label = "one thread" if threads == 1 else f"all cores ({threads} threads)"
        print(f"\n**{label}**: ms per call (samples per second)\n")
        print("| model | engine | " + " | ".join(f"batch {b}" for b in args.batches) + " |")
        print("|---|---|" + "---:|" * len(args.batches))
        for name in models:
            for engine in ("torch", "torch portable", "ORT"):
                cells = []
                for b in args.batches:
                    t = result[(name, engine, threads, b)]
                    cells.append(f"{t * 1e3:.3g} ({b / t:,.0f}/s)")
                print(f"| {name} | {engine} | " + " | ".join(cells) + " |")
        if teacher is None:
            continue
        print(f"\nspeed-up over the {teacher} in the same engine (its time / the student's):\n")
        print("| model | engine | " + " | ".join(f"batch {b}" for b in args.batches) + " |")
        print("|---|---|" + "---:|" * len(args.batches))
        for name in [m for m in models if m != teacher]:
            for engine in ("torch", "ORT"):
                cells = [
                    f"{result[(teacher, engine, threads, b)] / result[(name, engine, threads, b)]:.1f}x"
                    for b in args.batches
                ]
                print(f"| {name} | {engine} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
