"""Every engine on one device in one short run: speed, and kernels per training step.

    python benchmarks/accelerator.py                        # CUDA if there is one, else the CPU
    python benchmarks/accelerator.py --device cpu --quick   # a minute on a 2-core CPU
    python benchmarks/accelerator.py --markdown             # the table as markdown, for the docs
    python benchmarks/accelerator.py --device cpu --accelerator-paths   # GPU paths, on a CPU

Made for a lent GPU (a few minutes of device time in all): one command that shows what each
engine's accelerator path costs, with the device named in the first line. Models: an MPS of 196
and of 784 sites (``MPSClassifier``, D = 16 and 10, [1, x] map, 10 classes; ``auto`` is the
log-depth products on an accelerator at D <= ``TREE_MAX_BOND_DIM``, the native scan on a CPU);
balanced trees over 256 and 1024 flat inputs (``TreeClassifier``, D = 8; native levels on a CPU,
the stable engine's grouped einsum steps elsewhere); a 4 x 4 PEPS over 28 x 28 images pooled by 7
(D = 3); ``TTLinear`` 4096 -> 4096 at rank 8. Batch 100 (the TT layer 256).

Columns: the plan (:meth:`~tnkd.students.GraphStudent.plan`: engine and kernel), training steps
(forward, cross-entropy, backward, Adam) and inference passes as samples per second (median of
timed repetitions after warm-up, CUDA synchronised), and the **kernels of one training step**:
the device kernels a profiled step launches on CUDA, or on a CPU the operators it dispatches
(``aten::`` calls not made from inside another one). An accelerator path should take a
fixed, small number of kernels per step (log-depth products, batched level matmuls), not one
launch per site: compare the two sizes of each family. ``--accelerator-paths`` runs the paths
an accelerator takes on whatever device is given (the MPS's log-depth products, the trees' stable
engine), so that their operator counts can be read without a GPU.
"""

from __future__ import annotations

import argparse

import torch
from contraction import BATCH, CLASSES, inference_step, samples_per_second, train_step
from torch.profiler import ProfilerActivity, profile

from tnkd.students import MPSClassifier, PEPSClassifier, TreeClassifier, TTLinear


def models(accelerator_paths: bool) -> list[tuple[str, torch.nn.Module, torch.Tensor, int]]:
    """(name, model, input, number of classes) of every family measured."""
    torch.manual_seed(0)
    chain = {"method": "log_depth"} if accelerator_paths else {}
    tree = {"method": "stable"} if accelerator_paths else {}
    flat = lambda n, b=BATCH: torch.rand(b, n)  # noqa: E731
    return [
        ("MPS 196 sites, D = 16", MPSClassifier(196, CLASSES, 16, **chain), flat(196), CLASSES),
        ("MPS 784 sites, D = 10", MPSClassifier(784, CLASSES, 10, **chain), flat(784), CLASSES),
        ("tree 256 leaves, D = 8", TreeClassifier((256,), CLASSES, 8, **tree), flat(256), CLASSES),
        (
            "tree 1024 leaves, D = 8",
            TreeClassifier((1024,), CLASSES, 8, **tree),
            flat(1024),
            CLASSES,
        ),
        (
            "PEPS 4 x 4, D = 3",
            PEPSClassifier((1, 28, 28), CLASSES, 3, patch=1, pool=7),
            torch.rand(BATCH, 1, 28, 28),
            CLASSES,
        ),
        ("TTLinear 4096 -> 4096, r 8", TTLinear(4096, 4096, ranks=8), flat(4096, 256), 4096),
    ]


def kernels_per_step(step, device: torch.device) -> int:
    """Device kernels (CUDA) or top-level operators (CPU) of one call of ``step``."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)

    def nested(e) -> bool:
        parent = e.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return True
            parent = parent.cpu_parent
        return False

    return sum(1 for e in events if e.name.startswith("aten::") and not nested(e))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default, help=f"cpu or cuda (default {default})")
    parser.add_argument("--quick", action="store_true", help="3 timed repetitions, not 10")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument(
        "--accelerator-paths", action="store_true", help="the accelerator paths on any device"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {name}, torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)")
    unit = "device kernels" if device.type == "cuda" else "operators"
    rows = []
    for label, model, x, classes in models(args.accelerator_paths):
        model, x = model.to(device), x.to(device)
        y = torch.randint(0, classes, (x.shape[0],), device=device)
        train = train_step(model, model, x, y)
        train()  # warm-up: plans, native builds, allocator
        plan = model.plan(device)
        reps = 3 if args.quick else 10
        speed = samples_per_second(train, reps, device=device) * x.shape[0] / BATCH
        infer = (
            samples_per_second(inference_step(model, x), reps, device=device) * x.shape[0] / BATCH
        )
        rows.append(
            (label, f"{plan.engine}: {plan.kernel}", speed, infer, kernels_per_step(train, device))
        )
        print(
            f"  {label}: {rows[-1][1]}, train {speed:,.0f}/s, infer {infer:,.0f}/s, "
            f"{rows[-1][4]} {unit} per training step",
            flush=True,
        )
    if args.markdown:
        print(
            f"\n| model | plan | training samples/s | inference samples/s | {unit} per training step |"
        )
        print("|---|---|---:|---:|---:|")
        for label, plan, speed, infer, count in rows:
            print(f"| {label} | {plan} | {speed:,.0f} | {infer:,.0f} | {count} |")


if __name__ == "__main__":
    main()
