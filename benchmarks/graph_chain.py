"""A chain drawn as a graph against ``MPSClassifier`` of the same shape: training speed.

    python benchmarks/graph_chain.py                 # 64:10, 196:8, 784:10, one torch thread
    python benchmarks/graph_chain.py --sizes 196:8   # one chain
    python benchmarks/graph_chain.py --markdown

Three models per size, timed interleaved (one step of each in turn; the figure is BATCH over the
median step time after warm-up, samples per second):

* **class**: ``MPSClassifier(num_sites, 10, bond_dim)``, [1, x] map, the label core in the
  middle (or, for the last two columns, ``label_position=num_sites``: at the end);
* **drawn**: the same chain drawn by hand with ``make_node`` / ``connect`` (open ends: the end
  cores are (d, D) and (D, d) matrices, the label core (D, C, D) between the two halves, or a
  (D, C) label core as the chain's last node) and trained as a
  :class:`~tnkd.students.graph.GraphStudent`;
* **base** (``--baseline REV``): the ``MPSClassifier`` of commit REV (see ``baseline.py``).

A training step is forward + cross-entropy + backward + Adam, batch 100, inputs in [0, 1].
The last line is what ``student.plan()`` says runs the drawn chain. Run it through
``../shared/tools/quiet --`` on a shared machine; the ratios compare models of one run.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import sys

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


def measure(num_sites: int, bond_dim: int, reps: int, base=None) -> dict:
    """Samples/s of the class and the drawn chain, label in the middle and at the end."""
    torch.manual_seed(0)
    x = torch.rand(BATCH, num_sites)
    y = torch.randint(0, CLASSES, (BATCH,))
    models = {
        "class, middle": MPSClassifier(num_sites, CLASSES, bond_dim),
        "drawn, middle": GraphStudent(drawn_chain(num_sites, bond_dim, "middle")),
        "class, end": MPSClassifier(num_sites, CLASSES, bond_dim, label_position=num_sites),
        "drawn, end": GraphStudent(drawn_chain(num_sites, bond_dim, "end")),
    }
    if base is not None:
        models["base class, middle"] = base.MPSClassifier(num_sites, CLASSES, bond_dim)
    steps = {name: train_step(m, m, x, y) for name, m in models.items()}
    return {
        "size": f"{num_sites} sites, D = {bond_dim}",
        "speed": interleaved(steps, reps, torch.device("cpu")),
        "plan": models["drawn, middle"].plan(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="64:10,196:8,784:10", help="SITES:D,...")
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--baseline", default=None, help="also the MPSClassifier of commit REV")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = None
    if args.baseline:
        from baseline import OUT, materialise

        materialise(args.baseline)
        sys.path.insert(0, str(OUT))
        import tnkd_base.students as base
    sizes = [tuple(int(v) for v in s.split(":")) for s in args.sizes.split(",")]
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), batch {BATCH}, training samples/s"
    )
    head = "| chain | class, label in the middle | drawn | class, label at the end | drawn |"
    head += " class / base |" if base else ""
    print(head)
    print("|---" * (6 if base else 5) + "|")
    for n, d in sizes:
        r = measure(n, d, args.reps, base)
        s = r["speed"]
        cells = []
        for where in ("middle", "end"):
            c, g = s[f"class, {where}"], s[f"drawn, {where}"]
            cells += [f"{c:,.0f}", f"{g:,.0f} ({g / c:.2f}x)"]
        if base:
            cells.append(f"{s['class, middle'] / s['base class, middle']:.2f}x")
        print(f"| {r['size']} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nplan of the drawn chain: {r['plan']}")


if __name__ == "__main__":
    main()
