"""Samples per second of a 784-site MPS classifier: tnkd's fast and generic paths vs peers.

    python benchmarks/contraction.py              # full table (several minutes on 2 cores)
    python benchmarks/contraction.py --quick      # fewer repetitions, D = 10 only
    python benchmarks/contraction.py --markdown   # the table as markdown, for the README

Models (784 sites, d = 2, 10 classes, batch 100, random inputs in [0, 1]):

* tnkd fast: ``MPSClassifier`` through ``contract_chain`` (method "auto": the scan on CPU; the
  README's table was measured with the sweep, ``method="sweep"``, before the scan existed),
  normalised logits.
* tnkd generic: the same MPS's ``to_graph()`` compiled by ``CompiledNetwork`` (one opt_einsum
  expression, path planned once; no renormalisation, raw values).
* TensorKrowch 1.1.6 ``MPSLayer`` (``randn_eye`` init, ``auto_stack=True``, ``auto_unbind=False``,
  traced once), with and without ``renormalize=True``; the faster of the two is the peer.
* naive loop: a per-site sweep written plainly in torch (one einsum per site, no renormalisation).

A training step is forward + cross-entropy + backward + Adam step; inference is a forward pass
under ``torch.inference_mode``. Each figure is the median of several timed repetitions after
warm-up. Ratios are tnkd fast / peer in the same run; figures move from run to run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tnkd.feature_maps import linear_features, trig_features
from tnkd.students import MPSClassifier

SITES, CLASSES, BATCH = 784, 10, 100


class NaiveMPS(nn.Module):
    """A plain per-site sweep: one einsum per site, no renormalisation."""

    def __init__(self, bond_dim: int, feature_map: str) -> None:
        super().__init__()
        self.features = linear_features if feature_map == "linear" else trig_features
        eye = torch.eye(bond_dim).unsqueeze(1).expand(bond_dim, 2, bond_dim)
        w = torch.tensor([1.0, 0.0]) if feature_map == "linear" else torch.ones(2)
        self.cores = nn.Parameter(
            eye * w.view(1, 2, 1) + 1e-2 * torch.randn(SITES, bond_dim, 2, bond_dim) / bond_dim**0.5
        )
        self.left = nn.Parameter(torch.ones(bond_dim) / bond_dim**0.5)
        self.out = nn.Parameter(torch.randn(bond_dim, CLASSES) / bond_dim**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phi = self.features(x)
        v = self.left.expand(x.shape[0], -1)
        for i in range(SITES):
            v = torch.einsum("bl,lsr,bs->br", v, self.cores[i], phi[:, i])
        return v @ self.out


def samples_per_second(
    fn: Callable[[], object],
    reps: int,
    warmup: int = 2,
    budget_s: float = 60.0,
    device: torch.device | None = None,
) -> float:
    """BATCH / the median time of ``fn`` after warm-up (synchronising a CUDA ``device``)."""

    def sync() -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return BATCH / statistics.median(times)


def train_step(
    model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], x, y
) -> Callable[[], None]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x), y).backward()
        opt.step()

    return step


def inference_step(
    forward: Callable[[torch.Tensor], torch.Tensor], x
) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        with torch.inference_mode():
            return forward(x)

    return step


def _finite_nonzero(out: torch.Tensor) -> bool:
    return bool(torch.isfinite(out).all() and out.abs().amax() > 0)


def tensorkrowch_models(
    bond_dim: int, feature_map: str, sites: int = SITES
) -> list[tuple[str, nn.Module, Callable]]:
    """TensorKrowch MPSLayer as its docs recommend, plain and with renormalize=True."""
    import tensorkrowch as tk

    out = []
    embed = (
        (lambda x: tk.embeddings.poly(x, degree=1))
        if feature_map == "linear"
        else tk.embeddings.unit
    )
    for renormalize in (False, True):
        mps = tk.models.MPSLayer(
            n_features=sites + 1,
            in_dim=2,
            out_dim=CLASSES,
            bond_dim=bond_dim,
            boundary="obc",
            init_method="randn_eye",
            std=1e-9,
        )
        mps.auto_stack, mps.auto_unbind = True, False
        mps.trace(torch.zeros(1, sites, 2), renormalize=renormalize)

        def forward(x: torch.Tensor, mps=mps, renormalize=renormalize) -> torch.Tensor:
            return mps(embed(x), renormalize=renormalize)

        out.append((f"TensorKrowch{' renorm' if renormalize else ''}", mps, forward))
    return out


def run(bond_dims: list[int], feature_maps: list[str], reps: int, markdown: bool) -> None:
    torch.manual_seed(0)
    x = torch.rand(BATCH, SITES)
    y = torch.randint(0, CLASSES, (BATCH,))
    try:
        import tensorkrowch  # noqa: F401

        have_tk = True
    except ImportError:
        have_tk = False
        print(
            "TensorKrowch is not installed (pip install --no-deps tensorkrowch==1.1.6): its rows are skipped"
        )
    rows = []
    for fm in feature_maps:
        for bond in bond_dims:
            fast = MPSClassifier(SITES, CLASSES, bond_dim=bond, feature_map=fm)
            generic = MPSClassifier(SITES, CLASSES, bond_dim=bond, feature_map=fm, output="raw")
            t0 = time.perf_counter()
            generic.generic_forward(x[:1])
            plan_s = time.perf_counter() - t0
            models: list[tuple[str, nn.Module, Callable]] = [
                ("tnkd fast", fast, fast),
                ("tnkd generic", generic, generic.generic_forward),
                ("naive loop", NaiveMPS(bond, fm), None),
            ]
            models[2] = ("naive loop", models[2][1], models[2][1])
            if have_tk:
                models += tensorkrowch_models(bond, fm)
            results = {}
            for name, model, forward in models:
                budget = 20.0 if name != "tnkd fast" else 60.0
                train = samples_per_second(train_step(model, forward, x, y), reps, budget_s=budget)
                infer = samples_per_second(inference_step(forward, x), reps, budget_s=budget)
                ok = _finite_nonzero(inference_step(forward, x)())
                results[name] = (train, infer, ok)
            peer_names = [n for n in results if n.startswith("TensorKrowch")]
            peer = max(peer_names, key=lambda n: results[n][0]) if peer_names else None
            for name, (train, infer, ok) in results.items():
                rows.append(
                    (
                        fm,
                        bond,
                        name,
                        train,
                        infer,
                        ok,
                        plan_s if name == "tnkd generic" else math.nan,
                    )
                )
            fast_train, fast_infer, _ = results["tnkd fast"]
            if peer:
                rows.append(
                    (
                        fm,
                        bond,
                        f"ratio fast / {peer}",
                        fast_train / results[peer][0],
                        fast_infer / max(results[n][1] for n in peer_names),
                        None,
                        math.nan,
                    )
                )
            rows.append(
                (
                    fm,
                    bond,
                    "ratio fast / naive",
                    fast_train / results["naive loop"][0],
                    fast_infer / results["naive loop"][1],
                    None,
                    math.nan,
                )
            )
            _print(
                rows[-len(results) - 2 :],
                markdown,
                header=not any(r[0] == fm and r[1] < bond for r in rows),
            )
    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; batch {BATCH}, {SITES} sites, "
        f"d = 2, {CLASSES} classes; median of up to {reps} repetitions"
    )


def _print(rows, markdown: bool, header: bool) -> None:
    if header:
        if markdown:
            print(
                "\n| map | D | model | train samples/s | inference samples/s | finite, non-zero | planning (s) |"
            )
            print("|---|---|---|---|---|---|---|")
        else:
            print(
                f"\n{'map':7s} {'D':>3s} {'model':34s} {'train/s':>10s} {'infer/s':>10s} {'finite':>7s} {'plan s':>7s}"
            )
    for fm, bond, name, train, infer, ok, plan in rows:
        is_ratio = ok is None
        t = f"{train:.1f}x" if is_ratio else f"{train:,.0f}"
        i = f"{infer:.1f}x" if is_ratio else f"{infer:,.0f}"
        f = "" if is_ratio else ("yes" if ok else "NO")
        p = "" if math.isnan(plan) else f"{plan:.2f}"
        if markdown:
            print(f"| {fm} | {bond} | {name} | {t} | {i} | {f} | {p} |")
        else:
            print(f"{fm:7s} {bond:3d} {name:34s} {t:>10s} {i:>10s} {f:>7s} {p:>7s}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="D = 10 only, 3 repetitions")
    parser.add_argument("--bond-dims", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--feature-map", choices=["linear", "trig", "both"], default="both")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    bond_dims = [10] if args.quick else args.bond_dims
    maps = ["linear", "trig"] if args.feature_map == "both" else [args.feature_map]
    run(bond_dims, maps, 3 if args.quick else args.reps, args.markdown)


if __name__ == "__main__":
    main()
