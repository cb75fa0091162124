"""Samples per second of a binary tree tensor network: tnkd's TreeClassifier vs TensorKrowch's Tree.

    python benchmarks/tree_vs_tensorkrowch.py              # the table (a few minutes on 2 cores)
    python benchmarks/tree_vs_tensorkrowch.py --quick      # 64 and 256 sites, D = 8 only
    python benchmarks/tree_vs_tensorkrowch.py --markdown   # the table as markdown, for the README
    python benchmarks/tree_vs_tensorkrowch.py --phases --sizes 64:8   # where a training step goes
    python benchmarks/tree_vs_tensorkrowch.py --no-native     # also tnkd without its native kernels (the stable engine)

Models, same shapes (N sites with d = 2, the [1, x] map, 10 classes, batch 100, random inputs in
[0, 1]): N / 2 leaves of shape (2, 2, min(D, 4)), then one level of (D_in, D_in, D_out) nodes per
halving, bond dimensions capped as ``TreeClassifier`` caps them (min(D, product of the dims
below)), the root (D, D, 10):

* tnkd: ``TreeClassifier(input_shape=(N,), bond_dim=D)``: the graph drawn by ``tree_graph``,
  contracted by the planner's tree engine (``tnkd.tn.fused``: one batched step per tree level,
  a log-scale per sample, the whole contraction one autograd node with a hand-written backward,
  the normalised output in the same node and the [1, x] map fused with the leaves; on CPU the
  level loop runs in C++, ``tnkd/tn/csrc/tree_levels.cpp``: note "native level loop (C++)"),
  normalised logits (learned scale).
* tnkd without natives (``--no-native``; ``--python-loop``, its older name, from when the
  fallback was a Python level loop): the same model with ``tree_plan.native = False``,
  which runs the stable engine's grouped steps (the tree engine's fallback off the CPU or
  without a compiler), for a ratio in the same run.
* TensorKrowch 1.1.6 ``Tree`` with the same ``sites_per_layer`` / ``bond_dim`` lists, its
  default initialisation, ``auto_stack=True``, ``auto_unbind=False``, traced once (the settings its
  docs give for speed), fed ``tk.embeddings.poly(x, degree=1)``; raw output (it has no
  normalisation: with its near-identity start the values stay near 1 at these sizes).

* tnkd compiled (``--compile``): the same with ``method="compiled"`` (the stable engine
  through ``torch.compile``; compile time reported, not counted).

A training step is forward + cross-entropy + backward + Adam step; inference is a forward pass
under ``torch.inference_mode``. Timings are interleaved (tnkd, TensorKrowch, tnkd, ...) and each
figure is the fastest of the repetitions, so both models get the same chances on a shared
machine; ratios are against TensorKrowch in the same run.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time

import torch
import torch.nn.functional as F

from tnkd.students import TreeClassifier

CLASSES, BATCH, PHYS = 10, 100, 2


def tree_shapes(sites: int, bond_dim: int) -> tuple[list[int], list[list[int]]]:
    """TensorKrowch's ``sites_per_layer`` and ``bond_dim`` for a balanced binary tree."""
    per_layer, dims = [], []
    below, count = PHYS, sites
    while count > 1:
        count //= 2
        up = min(bond_dim, below * below) if count > 1 else CLASSES
        per_layer.append(count)
        dims.append([below, below, up])
        below = up
    return per_layer, dims


def tensorkrowch_tree(sites: int, bond_dim: int):
    import tensorkrowch as tk

    per_layer, dims = tree_shapes(sites, bond_dim)
    tree = tk.models.Tree(sites_per_layer=per_layer, bond_dim=dims)
    tree.auto_stack, tree.auto_unbind = True, False
    tree.trace(torch.zeros(1, sites, PHYS))
    return tree, lambda x: tree(tk.embeddings.poly(x, degree=1))


def step_fns(model, forward, x, y):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def train() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x), y).backward()
        opt.step()

    def infer() -> None:
        with torch.inference_mode():
            forward(x)

    return train, infer


def interleaved(fns: dict[str, object], reps: int, warmup: int = 2) -> dict[str, float]:
    """Samples per second of each function, from its fastest of ``reps`` rounds taken in turn.

    The fastest round, not the median: on a shared machine other jobs only ever slow a round
    down, and interleaving gives every model the same chances at an undisturbed one.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: BATCH / min(t) for name, t in times.items()}


#: the label of the twin without native kernels
NO_NATIVE = "tnkd without natives (stable engine)"


def no_native_twin(model: TreeClassifier) -> TreeClassifier:
    """A copy of ``model`` that runs without the native kernels (the stable engine)."""
    twin = copy.deepcopy(model)
    twin.tree_plan.native = False
    return twin


def phases(configs: list[tuple[int, int]], steps: int = 300, no_native: bool = False) -> None:
    """Milliseconds per phase of a training step (zero_grad, forward, loss, backward, Adam).

    The two libraries' steps alternate (tnkd, TensorKrowch, tnkd, ...), as in the table, so
    each runs right after the other has filled the caches; each figure is the 10th percentile
    of ``steps`` steps (the first 20 left out).
    """
    torch.manual_seed(0)
    names = ("zero_grad", "forward", "loss", "backward", "Adam", "step")
    for sites, bond in configs:
        x = torch.rand(BATCH, sites)
        y = torch.randint(0, CLASSES, (BATCH,))
        ours = TreeClassifier(input_shape=(sites,), num_classes=CLASSES, bond_dim=bond)
        theirs, tk_forward = tensorkrowch_tree(sites, bond)
        timed = {}
        runs = [("tnkd", ours, ours), ("TensorKrowch", theirs, tk_forward)]
        if no_native:
            twin = no_native_twin(ours)
            runs.insert(1, (NO_NATIVE, twin, twin))
        for name, model, forward in runs:
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)

            def step(opt=opt, forward=forward, x=x, y=y) -> list[float]:
                t = [time.perf_counter()]
                opt.zero_grad(set_to_none=True)
                t.append(time.perf_counter())
                out = forward(x)
                t.append(time.perf_counter())
                loss = F.cross_entropy(out, y)
                t.append(time.perf_counter())
                loss.backward()
                t.append(time.perf_counter())
                opt.step()
                t.append(time.perf_counter())
                return [b - a for a, b in itertools.pairwise(t)] + [t[-1] - t[0]]

            timed[name] = (step, [])
        for _ in range(steps):
            for step, rows in timed.values():
                rows.append(step())
        print(f"\n{sites} sites, D = {bond}: ms per phase (10th percentile of {steps - 20} steps)")
        print(f"{'':>17s}" + "".join(f"{n:>11s}" for n in names))
        for name, (_, rows) in timed.items():
            cols = zip(*rows[20:], strict=True)
            cells = [sorted(c)[len(c) // 10] * 1e3 for c in cols]
            print(f"{name:>17s}" + "".join(f"{c:11.3f}" for c in cells))
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} thread(s); batch {BATCH}")


def run(
    configs: list[tuple[int, int]],
    reps: int,
    markdown: bool,
    compile_: bool,
    no_native: bool = False,
) -> None:
    torch.manual_seed(0)
    header = True
    for sites, bond in configs:
        x = torch.rand(BATCH, sites)
        y = torch.randint(0, CLASSES, (BATCH,))
        ours = TreeClassifier(input_shape=(sites,), num_classes=CLASSES, bond_dim=bond)
        theirs, tk_forward = tensorkrowch_tree(sites, bond)
        _, dims = tree_shapes(sites, bond)
        ours_shapes = [list(b.shape[1:]) for b in ours.blocks]
        if ours_shapes != dims:
            raise RuntimeError(f"shapes differ: tnkd {ours_shapes}, TensorKrowch {dims}")
        params = sum(p.numel() for p in theirs.parameters())
        if ours.parameter_count() - 1 != params:  # tnkd also learns the logit scale
            raise RuntimeError(f"parameter counts differ: {ours.parameter_count() - 1} vs {params}")
        models = {"tnkd": (ours, ours), "TensorKrowch": (theirs, tk_forward)}
        plan = ours.plan()
        leaves = ", [1, x] in the leaves" if ours._linear_leaves else ""
        levels = f"{plan.engine} engine, {len(ours.tree_plan.levels)} levels{leaves}"
        notes = {"tnkd": f"{levels}, {plan.kernel}"}
        if no_native:
            twin = no_native_twin(ours)
            models[NO_NATIVE] = (twin, twin)
            notes[NO_NATIVE] = "stable engine (tree_plan.native = False)"
        if compile_:
            compiled = TreeClassifier(
                input_shape=(sites,), num_classes=CLASSES, bond_dim=bond, method="compiled"
            )
            start = time.perf_counter()
            train, infer = step_fns(compiled, compiled, x, y)
            train()
            infer()
            notes["tnkd compiled"] = f"compiled in {time.perf_counter() - start:.0f} s"
            models["tnkd compiled"] = (compiled, compiled)
        steps = {name: step_fns(model, fwd, x, y) for name, (model, fwd) in models.items()}
        train = interleaved({name: fns[0] for name, fns in steps.items()}, reps)
        infer = interleaved({name: fns[1] for name, fns in steps.items()}, reps)
        with torch.no_grad():
            notes["TensorKrowch"] = (
                "finite" if bool(torch.isfinite(tk_forward(x)).all()) else "NOT finite"
            )
        if no_native:
            notes["tnkd"] += (
                f"; {train['tnkd'] / train[NO_NATIVE]:.2f}x the stable engine's training, "
                f"{infer['tnkd'] / infer[NO_NATIVE]:.2f}x its inference"
            )
        rows = [
            (
                sites,
                bond,
                params,
                name,
                train[name],
                infer[name],
                train[name] / train["TensorKrowch"],
                infer[name] / infer["TensorKrowch"],
                notes.get(name, ""),
            )
            for name in models
        ]
        _print(rows, markdown, header)
        header = False
    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} thread(s); batch {BATCH}, d = {PHYS}, "
        f"{CLASSES} classes; fastest of {reps} interleaved repetitions"
    )


def _print(rows, markdown: bool, header: bool) -> None:
    cols = (
        "sites",
        "D",
        "tree params",
        "model",
        "train samples/s",
        "infer samples/s",
        "train vs TK",
        "infer vs TK",
        "note",
    )
    if header:
        if markdown:
            print("\n| " + " | ".join(cols) + " |")
            print("|" + "---|" * len(cols))
        else:
            print("\n" + " ".join(f"{c:>15s}" for c in cols))
    for sites, bond, params, name, train, infer, rt, ri, note in rows:
        cells = (
            f"{sites}",
            f"{bond}",
            f"{params:,}",
            name,
            f"{train:,.0f}",
            f"{infer:,.0f}",
            f"{rt:.2f}x",
            f"{ri:.2f}x",
            note,
        )
        if markdown:
            print("| " + " | ".join(cells) + " |")
        else:
            print(" ".join(f"{c:>15s}" for c in cells))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="64 and 256 sites at D = 8, 5 reps")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time TreeClassifier(method='compiled') (torch.compile)",
    )
    parser.add_argument(
        "--sizes", nargs="+", default=None, help="sites:D pairs, e.g. 256:8 4096:4 (powers of 2)"
    )
    parser.add_argument(
        "--phases", action="store_true", help="ms per phase of a training step, not the table"
    )
    parser.add_argument(
        "--no-native",
        "--python-loop",  # the older name (the fallback was then a Python level loop)
        dest="no_native",
        action="store_true",
        help="also time tnkd without its native kernels (the stable engine, its fallback)",
    )
    args = parser.parse_args()
    configs = (
        [tuple(int(v) for v in item.split(":")) for item in args.sizes]
        if args.sizes
        else (
            [(64, 8), (256, 8)]
            if args.quick
            else [(64, 8), (64, 16), (256, 8), (256, 16), (1024, 8), (1024, 16)]
        )
    )
    if args.phases:
        phases(configs, no_native=args.no_native)
        return
    run(configs, 5 if args.quick else args.reps, args.markdown, args.compile, args.no_native)


if __name__ == "__main__":
    main()
