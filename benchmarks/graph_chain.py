"""A chain drawn as a graph against ``MPSClassifier`` of the same shape: training speed.

    python benchmarks/graph_chain.py                 # 64:10, 196:8, 784:10, one torch thread
    python benchmarks/graph_chain.py --sizes 196:8   # one chain
    python benchmarks/graph_chain.py --markdown

Three models per size, timed interleaved (one step of each in turn; the figure is BATCH over the
median step time after warm-up, samples per second):

* **class**: ``MPSClassifier(num_sites, 10, bond_dim)``, [1, x] map, label in the middle;
* **drawn, label in the middle**: the same chain drawn by hand with ``make_node`` / ``connect``
  (open ends: the two end cores are (d, D) and (D, d) matrices, the label core (D, C, D) between
  the two halves) and trained as a :class:`~tnkd.students.graph.GraphStudent`;
* **drawn, label at one end**: the label core (D, C) is the last node of the chain.

A training step is forward + cross-entropy + backward + Adam, batch 100, inputs in [0, 1].
The column "plan" is what ``student.plan()`` says runs the drawn chain. Run it through
``../shared/tools/quiet --`` on a shared machine; the ratios compare models of one run.
"""

from __future__ import annotations

import argparse
import itertools
import platform

import torch
from chain_speed import interleaved
from contraction import BATCH, CLASSES, train_step

from tnkd.students import GraphStudent, MPSClassifier
from tnkd.tn.graph import TNGraph, connect, make_node


def drawn_chain(num_sites: int, bond_dim: int, label: str = "middle", d: int = 2) -> TNGraph:
    """An open-boundary MPS drawn node by node; the label core in the middle or at the end."""
    n, bond = num_sites, bond_dim
    cores = []
    for i in range(n):
        if i == 0:
            cores.append(make_node((d, bond), f"A{i}", ["phys", "right"]))
        elif i == n - 1 and label != "end":
            cores.append(make_node((bond, d), f"A{i}", ["left", "phys"]))
        else:
            cores.append(make_node((bond, d, bond), f"A{i}", ["left", "phys", "right"]))
    if label == "end":
        out = make_node((bond, CLASSES), "label", ["left", "label"])
        chain = [*cores, out]
    else:
        out = make_node((bond, CLASSES, bond), "label", ["left", "label", "right"])
        chain = [*cores[: n // 2], out, *cores[n // 2 :]]
    for a, b in itertools.pairwise(chain):
        connect(a, "right", b, "left")
    inputs = [make_node((d,), f"x{i}", ["phys"]) for i in range(n)]
    for core, x in zip(cores, inputs, strict=True):
        connect(core, "phys", x, "phys")
    return TNGraph([*chain, *inputs], [x.name for x in inputs], [out["label"]])


def measure(num_sites: int, bond_dim: int, reps: int) -> dict:
    torch.manual_seed(0)
    x = torch.rand(BATCH, num_sites)
    y = torch.randint(0, CLASSES, (BATCH,))
    models = {
        "class": MPSClassifier(num_sites, CLASSES, bond_dim),
        "drawn, label in the middle": GraphStudent(drawn_chain(num_sites, bond_dim, "middle")),
        "drawn, label at one end": GraphStudent(drawn_chain(num_sites, bond_dim, "end")),
    }
    steps = {name: train_step(m, m, x, y) for name, m in models.items()}
    speed = interleaved(steps, reps, torch.device("cpu"))
    plan = getattr(models["drawn, label in the middle"], "plan", None)
    return {
        "size": f"{num_sites} sites, D = {bond_dim}",
        "speed": speed,
        "plan": plan().engine if callable(plan) else "stable",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="64:10,196:8,784:10", help="SITES:D,...")
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [tuple(int(v) for v in s.split(":")) for s in args.sizes.split(",")]
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), batch {BATCH}, training samples/s"
    )
    head = "| chain | class | drawn, label in the middle | drawn, label at one end | plan |"
    print(head)
    print("|---|---|---|---|---|")
    for n, d in sizes:
        r = measure(n, d, args.reps)
        s = r["speed"]
        c = s["class"]
        cells = [f"{c:,.0f}"] + [
            f"{s[k]:,.0f} ({s[k] / c:.2f}x)"
            for k in ("drawn, label in the middle", "drawn, label at one end")
        ]
        print(f"| {r['size']} | " + " | ".join(cells) + f" | {r['plan']} |", flush=True)


if __name__ == "__main__":
    main()
