"""Training and inference speed of an MPS classifier: the new chain contraction against today's.

    python benchmarks/chain_speed.py                # 784 sites D = 10, 16, 20, 50; 196 sites D = 8, 16, 32
    python benchmarks/chain_speed.py --quick        # 784 sites D = 10 and 196 sites D = 16, 3 repetitions
    python benchmarks/chain_speed.py --markdown     # the tables as markdown, for the README
    python benchmarks/chain_speed.py --threads 1    # torch intra-op threads (default: torch's choice)
    python benchmarks/chain_speed.py --threads 1 --clock cpu   # per CPU-second: for shared machines
    python benchmarks/chain_speed.py --baseline REV   # also the MPS of commit REV, same rounds

Models (d = 2 with the [1, x] map, 10 classes, batch 100, random inputs in [0, 1]):

* **today**: ``MPSClassifier(method="scan")``, the Python scan, the chain engine's fallback
  where the native scan does not run. (Before the chain engine had one Python fallback this
  column was the autograd sweep, ``method="sweep"``, which now runs the scan.)
* **new**: ``MPSClassifier(method="auto")``; the column "auto" says what it resolved to (see
  ``tnkd.tn.planner.chain_kernel``).
* **base** (with ``--baseline REV``): ``MPSClassifier(method="auto")`` of commit REV
  (:mod:`baseline`), to show that a refactor lost no speed.
* **TensorKrowch**: ``tk.models.MPSLayer`` set up as in ``benchmarks/contraction.py``
  (``randn_eye`` init, ``auto_stack=True``, ``auto_unbind=False``, traced once), plain and with
  ``renormalize=True``; the faster of the two in training is the peer.

A training step is forward + cross-entropy + backward + Adam step; inference is a forward pass
under ``torch.inference_mode``. The models of one configuration are timed **interleaved** (one
step of each in turn, repeated), so that load from other processes on a shared machine falls on
all of them alike; each figure is BATCH / the median step time after warm-up. The ratios compare
models of the same run. ``--clock cpu`` times each step by this process's CPU time instead of the
wall clock: with one thread that is the step's own work, not the time other processes held the
cores (with more threads it would also count threads spinning while they wait).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from contraction import BATCH, CLASSES, inference_step, tensorkrowch_models, train_step

from tnkd.students import MPSClassifier
from tnkd.tn.planner import chain_kernel

FULL = [(784, 10), (784, 16), (784, 20), (784, 50), (196, 8), (196, 16), (196, 32)]
QUICK = [(784, 10), (196, 16)]


def interleaved(
    steps: dict[str, Callable[[], object]],
    reps: int,
    device: torch.device,
    clock: Callable[[], float] = time.perf_counter,
    warmup: int = 2,
    budget_s: float = 90.0,
) -> dict[str, float]:
    """Samples per second of each step function, timed one step of each in turn by ``clock``.

    The order of the steps turns by one every round, so each follows each as often.

    Stops after ``reps`` rounds, or after 3 rounds once ``budget_s`` (wall clock) has passed.
    """

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in steps.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in steps}
    start = time.perf_counter()
    names = list(steps)
    for rnd in range(reps):
        # the order turns every round: a step timed right after another model's pays for the
        # caches that model evicted (measured: up to 20 % at 196 sites, D = 8, inference)
        for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
            t0 = clock()
            steps[name]()
            sync()
            times[name].append(clock() - t0)
        if rnd >= 2 and time.perf_counter() - start > budget_s:
            break
    return {name: BATCH / statistics.median(ts) for name, ts in times.items()}


def measure(
    sites: int,
    bond_dim: int,
    reps: int,
    device: torch.device,
    with_tk: bool,
    clock: Callable[[], float] = time.perf_counter,
    base: Any = None,
) -> dict[str, object]:
    """One configuration: samples/s of today, new and TensorKrowch, training and inference."""
    torch.manual_seed(0)
    x = torch.rand(BATCH, sites, device=device)
    y = torch.randint(0, CLASSES, (BATCH,), device=device)
    models: dict[str, tuple[torch.nn.Module, Callable]] = {}
    for name, method in (("today", "scan"), ("new", "auto")):
        model = MPSClassifier(sites, CLASSES, bond_dim=bond_dim, method=method).to(device)
        models[name] = (model, model)
    if base is not None:
        model = base.MPSClassifier(sites, CLASSES, bond_dim=bond_dim).to(device)
        models["base"] = (model, model)
    if with_tk:
        for name, model, forward in tensorkrowch_models(bond_dim, "linear", sites):
            models[name] = (model.to(device), forward)
    steps = {n: train_step(m, f, x, y) for n, (m, f) in models.items()}
    train = interleaved(steps, reps, device, clock)
    infer = interleaved(
        {n: inference_step(f, x) for n, (_, f) in models.items()}, reps, device, clock
    )
    with torch.inference_mode():
        out = models["new"][1](x)
    tk_names = [n for n in models if n.startswith("TensorKrowch")]
    peer = max(tk_names, key=lambda n: train[n]) if tk_names else None
    return {
        "sites": sites,
        "D": bond_dim,
        "auto": chain_kernel("auto", bond_dim, device)[0],
        "train": train,
        "infer": infer,
        "peer": peer,
        "finite": bool(torch.isfinite(out).all()),
    }


def table(results: list[dict], mode: str, markdown: bool) -> list[str]:
    """Rows of one table (``mode`` is "train" or "infer")."""
    head = [
        "sites",
        "D",
        "auto",
        "today",
        "new",
        "TensorKrowch",
        "new / today",
        "new / TensorKrowch",
    ]
    with_base = "base" in results[0][mode]
    if with_base:
        head.append("new / base")
    rows = []
    for r in results:
        speeds = r[mode]
        peer = speeds[r["peer"]] if r["peer"] else float("nan")
        rows.append(
            [
                str(r["sites"]),
                str(r["D"]),
                r["auto"],
                f"{speeds['today']:,.0f}",
                f"{speeds['new']:,.0f}",
                f"{peer:,.0f}" if r["peer"] else "-",
                f"{speeds['new'] / speeds['today']:.2f}x",
                f"{speeds['new'] / peer:.1f}x" if r["peer"] else "-",
            ]
        )
        if with_base:
            rows[-1].append(f"{speeds['new'] / speeds['base']:.2f}x")
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return lines + ["| " + " | ".join(row) + " |" for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    return [
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in [head, *rows]
    ]


def machine(device: torch.device) -> str:
    """One line naming the device, threads and library versions."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        model = platform.processor() or "CPU"
        try:
            with open("/proc/cpuinfo") as f:
                model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
        except (OSError, StopIteration):
            pass
        name = f"{model}, {torch.get_num_threads()} torch threads"
    try:
        import tensorkrowch

        tk = f", TensorKrowch {tensorkrowch.__version__}"
    except ImportError:
        tk = ""
    return f"{name}; torch {torch.__version__}{tk}; batch {BATCH}, d = 2 ([1, x] map), {CLASSES} classes"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="784/D=10 and 196/D=16, 3 rounds")
    parser.add_argument("--reps", type=int, default=11, help="interleaved rounds per table")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-tensorkrowch", action="store_true", help="skip the peer")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="time steps by wall or CPU time"
    )
    parser.add_argument("--baseline", default=None, help="a commit to compare with (new / base)")
    args = parser.parse_args()
    base = None
    if args.baseline:
        from baseline import OUT, materialise

        materialise(args.baseline)
        sys.path.insert(0, str(OUT))
        import tnkd_base.students as base
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with_tk = not args.no_tensorkrowch
    if with_tk:
        try:
            import tensorkrowch  # noqa: F401
        except ImportError:
            print(
                "TensorKrowch is not installed (pip install --no-deps tensorkrowch==1.1.6): skipped"
            )
            with_tk = False
    configs, reps = (QUICK, 3) if args.quick else (FULL, args.reps)
    print(f"# {machine(device)}; {args.clock} clock")
    t0 = time.perf_counter()
    results = []
    for sites, bond in configs:
        results.append(measure(sites, bond, reps, device, with_tk, clock, base))
        r = results[-1]
        print(
            f"  measured {sites} sites D = {bond}: train new/today "
            f"{r['train']['new'] / r['train']['today']:.2f}x, outputs finite: {r['finite']}",
            flush=True,
        )
    for mode, title in (("train", "Training"), ("infer", "Inference")):
        unit = "per CPU-second" if args.clock == "cpu" else "per second"
        print(f"\n{title} (samples {unit}; interleaved medians of up to {reps} rounds)\n")
        print("\n".join(table(results, mode, args.markdown)))
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
