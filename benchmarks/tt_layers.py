"""TT-layer speed: ``TTLinear`` vs one ``torch.einsum`` over the same cores vs ``nn.Linear``.

    python benchmarks/tt_layers.py              # the four layers, 7 interleaved rounds
    python benchmarks/tt_layers.py --quick      # 3 rounds
    python benchmarks/tt_layers.py --markdown   # the table as markdown, for the README
    python benchmarks/tt_layers.py --baseline REV   # also TTLinear of commit REV, same rounds

Layers (batch 256, bias on, float32, random inputs):

* 4096 -> 16, factors 8·8·8·8 / 2·2·2·2, rank 8: the worked example of the TT-layer tutorial;
* 4096 -> 4096, factors 8·8·8·8 / 8·8·8·8, ranks 8 and 16;
* 784 -> 1200, factors 7·7·4·4 / 5·5·6·8, rank 16: the first layer of the MNIST TT-MLP student.

Models, on identical cores:

* ``TTLinear``: tnkd's layer (its plan, chosen per batch size, is printed under the table);
* one-line einsum: ``torch.einsum("b i j k l, a i A p, p j B q, ... -> b A B ...", x, *cores)``,
  one call over the reshaped input and all cores (torch plans its pairwise order with
  opt_einsum on the actual shapes), plus the bias;
* ``nn.Linear``: the dense layer it replaces.

A training step is forward + MSE against a fixed random target + backward + Adam step; inference
is a forward pass under ``torch.inference_mode``. In every round each of the six (model, mode)
pairs is timed once, in turn, so that load from other processes falls on all of them alike;
figures are medians over the rounds after warm-up (``--stat min``: minima, steadier when other
jobs share the cores), and ratios are taken between figures of the same run (``x`` faster = the
other model's time / ``TTLinear``'s). Figures move from run to run on a shared machine; the ratios
move less. On a busy 2-core machine every multi-threaded kernel may wait a scheduler slice for
its second thread, which costs most to the model with the most kernels (here ``TTLinear``, then
the einsum); ``--threads 1`` measures the arithmetic without that wait.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tnkd.students import TTLinear
from tnkd.tn import tt_matrix

BATCH = 256
LAYERS = [
    ("4096 -> 16", (8, 8, 8, 8), (2, 2, 2, 2), 8),
    ("4096 -> 4096", (8, 8, 8, 8), (8, 8, 8, 8), 8),
    ("4096 -> 4096", (8, 8, 8, 8), (8, 8, 8, 8), 16),
    ("784 -> 1200", (7, 7, 4, 4), (5, 5, 6, 8), 16),
]
MODELS = ("TTLinear", "einsum", "nn.Linear")


class EinsumTT(nn.Module):
    """The same TT-matrix as one ``torch.einsum`` call over the input and all cores."""

    def __init__(self, layer: TTLinear) -> None:
        super().__init__()
        self.cores = nn.ParameterList(nn.Parameter(c.detach().clone()) for c in layer.cores)
        self.bias = nn.Parameter(layer.bias.detach().clone())
        self.in_factors = layer.in_factors
        d = len(self.cores)
        ins = [chr(ord("i") + k) for k in range(d)]
        outs = [chr(ord("A") + k) for k in range(d)]
        ranks = [chr(ord("R") + k) for k in range(d + 1)]
        terms = [ranks[k] + ins[k] + outs[k] + ranks[k + 1] for k in range(d)]
        self.equation = f"z{''.join(ins)},{','.join(terms)}->z{''.join(outs)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum(self.equation, x.reshape(-1, *self.in_factors), *self.cores)
        return y.reshape(x.shape[0], -1) + self.bias


def train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    """Forward, MSE, backward and an Adam step."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), target).backward()
        opt.step()

    return step


def inference_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """A forward pass under inference mode."""

    def step() -> None:
        with torch.inference_mode():
            model(x)

    return step


def interleaved_times(fns: dict, rounds: int, stat: str = "median", warmup: int = 2) -> dict:
    """Seconds per call (median or minimum over rounds), timing every function once per round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    reduce = statistics.median if stat == "median" else min
    return {name: reduce(t) for name, t in times.items()}


def measure(name: str, m, n, rank: int, rounds: int, stat: str, base=None) -> dict:
    """Train and inference times of the three models for one layer (and ``base.TTLinear``)."""
    torch.manual_seed(0)
    in_features, out_features = int(torch.tensor(m).prod()), int(torch.tensor(n).prod())
    tt = TTLinear(in_features, out_features, m, n, ranks=rank)
    models = {
        "TTLinear": tt,
        "einsum": EinsumTT(tt),
        "nn.Linear": nn.Linear(in_features, out_features),
    }
    if base is not None:  # the same layer and cores at the baseline commit
        models["base"] = base.TTLinear(in_features, out_features, m, n, ranks=rank)
        models["base"].load_state_dict(tt.state_dict())
    x = torch.randn(BATCH, in_features)
    target = torch.randn(BATCH, out_features)
    with torch.no_grad():
        for other in ("einsum", "base")[: len(models) - 2]:
            assert torch.allclose(models["TTLinear"](x), models[other](x), rtol=1e-3, atol=1e-4)
    fns = {}
    for label, model in models.items():
        fns[("train", label)] = train_step(model, x, target)
        fns[("inference", label)] = inference_step(model, x)
    times = interleaved_times(fns, rounds, stat)
    plan = tt.matvec_plan(x) if hasattr(tt, "matvec_plan") else None  # the training plan (cached)
    return {
        "layer": f"{name}, rank {rank}",
        "weights": (tt.weight_parameter_count(), in_features * out_features),
        "times": times,
        "plan": plan,
    }


def _plan_text(plan) -> str:
    if plan is None:
        return "(this TTLinear has no plan: an older version)"
    groups = " ".join(f"({a + 1}-{b})" if b - a > 1 else f"({a + 1})" for a, b in plan.groups)
    side = "last" if plan.reverse else "first"
    return f"cores {groups}, from the {side} group, chunks of {plan.chunk}"


def report(rows: list[dict], markdown: bool, rounds: int, stat: str) -> None:
    """Print the table: times in ms and TTLinear's speed-ups (other / TTLinear)."""
    header = [
        "layer",
        "TT / dense weights",
        "train ms: TTLinear",
        "einsum",
        "nn.Linear",
        "TTLinear faster than einsum",
        "than nn.Linear",
        "inference ms: TTLinear",
        "einsum",
        "nn.Linear",
        "TTLinear faster than einsum",
        "than nn.Linear",
    ]
    lines = []
    for row in rows:
        t = row["times"]
        cells = [row["layer"], f"{row['weights'][0]:,} / {row['weights'][1]:,}"]
        for mode in ("train", "inference"):
            mine = t[(mode, "TTLinear")]
            cells += [f"{1e3 * t[(mode, label)]:.2f}" for label in MODELS]
            cells += [f"{t[(mode, 'einsum')] / mine:.2f}x", f"{t[(mode, 'nn.Linear')] / mine:.2f}x"]
        lines.append(cells)
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for cells in lines:
            print("| " + " | ".join(cells) + " |")
    else:
        widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(header)]
        print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
        for cells in lines:
            print("  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)))
    print()
    for row in rows:
        print(f"{row['layer']}: TTLinear plan (training) {_plan_text(row['plan'])}")
        t = row["times"]
        if ("train", "base") in t:
            print("  against the baseline commit (its time / today's): " + ", ".join(
                f"{mode} {t[(mode, 'base')] / t[(mode, 'TTLinear')]:.2f}x"
                for mode in ("train", "inference")
            ))
    cpu = _cpu_name()
    print(
        f"\nbatch {BATCH}, float32; torch {torch.__version__}, {torch.get_num_threads()} threads "
        f"on {cpu}; {'medians' if stat == 'median' else 'minima'} of {rounds} interleaved rounds"
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 7")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument(
        "--stat",
        choices=["median", "min"],
        default="median",
        help="per-round times reduced by median (default) or minimum (steadier on a busy machine)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--layers", type=int, nargs="+", default=None, help="row numbers (0-3) to run; default all"
    )
    parser.add_argument(
        "--chunk-floats",
        default=None,
        help="override tnkd.tn.tt_matrix.CHUNK_FLOATS (an integer, or 'none': the whole batch)",
    )
    parser.add_argument("--baseline", help="also time TTLinear of this commit (benchmarks/baseline.py)")
    args = parser.parse_args()
    base = None
    if args.baseline:
        import sys

        from baseline import OUT, materialise

        materialise(args.baseline)
        sys.path.insert(0, str(OUT))
        import tnkd_base.students as base
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.chunk_floats is not None:
        tt_matrix.CHUNK_FLOATS = None if args.chunk_floats == "none" else int(args.chunk_floats)
    rounds = 3 if args.quick else args.rounds
    layers = [LAYERS[k] for k in args.layers] if args.layers else LAYERS
    rows = [measure(name, m, n, rank, rounds, args.stat, base) for name, m, n, rank in layers]
    report(rows, args.markdown, rounds, args.stat)


if __name__ == "__main__":
    main()
