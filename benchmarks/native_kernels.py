"""The native kernels of a commit against today's, call by call, in one process.

    python benchmarks/native_kernels.py --baseline 4018c06              # 1 thread, 200 rounds
    python benchmarks/native_kernels.py --baseline 4018c06 --threads 2 --only tree

A refactor of ``tnkd/tn/csrc`` must not cost speed, and a whole training step hides a few
percent of kernel time in its Python and ATen work. This records every native call of one
training step (forward, cross-entropy, backward) of each model below, then replays the recorded
calls on the baseline's build (:mod:`baseline`) and on today's: the two builds take turns call by
call (the order flips every call and round), so a shared machine's load falls on both alike.
First it checks that both builds return the same tensors, bit for bit.

Prints, per model and kernel, the median time of each build and old/new (above 1: today is
faster), then per model the sum of the medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from baseline import OUT, materialise

MODELS = {
    "mps 784 D=10": ("MPSClassifier", dict(num_sites=784, bond_dim=10), (784,)),
    "mps 196 D=16": ("MPSClassifier", dict(num_sites=196, bond_dim=16), (196,)),
    "mps 196 D=32": ("MPSClassifier", dict(num_sites=196, bond_dim=32), (196,)),
    "tree 196 D=8": ("TreeClassifier", dict(input_shape=(1, 28, 28), pool=2, bond_dim=8), None),
    "tree 1024 D=8": ("TreeClassifier", dict(input_shape=(1024,), bond_dim=8), None),
    "tree 64 D=8": ("TreeClassifier", dict(input_shape=(64,), bond_dim=8), None),
}


def clone(x):
    """A copy of the tensors in x (a tensor, or a list or tuple of them and other values)."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return type(x)(clone(y) for y in x)
    return x


def same(a, b) -> bool:
    """Whether two kernel results are equal, bit for bit (NaN included)."""
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and bool((a == b).logical_or(a.isnan() & b.isnan()).all())
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


class Recorder:
    """A compiled module whose calls are appended to ``log`` as (name, copied arguments)."""

    def __init__(self, module, log: list):
        self.module, self.log = module, log

    def __getattr__(self, name):
        fn = getattr(self.module, name)

        def call(*args):
            self.log.append((name, clone(args)))
            return fn(*args)

        return call


def record(native, students, cls: str, kwargs: dict, shape) -> tuple[str, list]:
    """The native calls of one training step of a batch of 100: (source name, calls)."""
    log: list = []
    saved = {name: native.kernels(name) for name in native.SOURCES}
    native._STATE.update({k: Recorder(m, log) for k, m in saved.items() if m is not None})
    try:
        model = getattr(students, cls)(num_classes=10, **kwargs)
        x = torch.rand(100, *(shape or kwargs["input_shape"]))
        loss = torch.nn.functional.cross_entropy(model(x), torch.randint(0, 10, (100,)))
        loss.backward()
    finally:
        native._STATE.update(saved)
    return ("chain_scan" if cls == "MPSClassifier" else "tree_levels"), log


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", required=True, help="the commit to compare with")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=200, help="rounds of every call")
    parser.add_argument("--only", default=None, help="models whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    materialise(args.baseline)
    sys.path.insert(0, str(OUT))
    import tnkd_base.tn.native as base_native

    import tnkd.students as students
    import tnkd.tn.native as native

    for name, (cls, kwargs, shape) in MODELS.items():
        if args.only and args.only not in name:
            continue
        source, log = record(native, students, cls, kwargs, shape)
        builds = (base_native.kernels(source), native.kernels(source))
        for fn, call in log:
            old, new = (getattr(b, fn)(*clone(call)) for b in builds)
            assert same(old, new), f"{name}: {fn} differs between the builds"
        times: list[dict] = [{}, {}]
        for rnd in range(args.reps + 2):  # the first two rounds warm up
            for j, (fn, call) in enumerate(log):
                for side in (0, 1) if (rnd + j) % 2 else (1, 0):
                    kernel = getattr(builds[side], fn)
                    start = time.perf_counter()
                    kernel(*call)
                    if rnd >= 2:
                        times[side].setdefault((j, fn), []).append(time.perf_counter() - start)
        total = [0.0, 0.0]
        for key in times[0]:
            old, new = (statistics.median(t[key]) for t in times)
            total = [total[0] + old, total[1] + new]
            print(
                f"  {name:14s} {key[1]:20s} old {old * 1e6:9.1f} us  new {new * 1e6:9.1f} us  "
                f"old/new {old / new:.3f}"
            )
        print(f"{name:14s} all kernels old/new {total[0] / total[1]:.3f} ({args.threads} threads)")


if __name__ == "__main__":
    main()
