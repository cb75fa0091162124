"""Samples per second of an MPS classifier with each chain kernel, on one device.

    python benchmarks/chain_methods.py                      # CPU, 784 and 196 sites
    python benchmarks/chain_methods.py --device cuda        # the same on a GPU
    python benchmarks/chain_methods.py --markdown           # the table as markdown
    python benchmarks/chain_methods.py --methods log_depth  # only some kernels

``method="scan"`` (the reference column) carries boundary vectors site by site from Python (N/2
sequential steps of small batched matmuls, D^2 work per site and sample, a hand-written backward
pass); ``method="native"`` runs the same scan in C++ (CPU only); ``method="log_depth"``
multiplies the transfer matrices pairwise in log depth (few, large kernels; D^3 work per site
and sample). ``"auto"`` picks the native scan on CPU, the log-depth products on an accelerator for D <=
``TREE_MAX_BOND_DIM`` and the scan above (:func:`tnkd.tn.planner.chain_kernel`). Models:
``MPSClassifier`` ([1, x] map, 10 classes, normalised logits), batch 100, random inputs in
[0, 1]. A training step is forward + cross-entropy + backward + Adam step; inference is a forward
pass under ``torch.inference_mode``. Each figure is the median of several timed repetitions after
warm-up (CUDA: synchronised). Figures move from run to run; the ratio columns compare kernels of
the same run.
"""

from __future__ import annotations

import argparse

import torch
from contraction import BATCH, CLASSES, inference_step, samples_per_second, train_step

from tnkd.students import MPSClassifier
from tnkd.tn.planner import TREE_MAX_BOND_DIM


def measure(
    sites: int, bond_dim: int, method: str, device: torch.device, reps: int
) -> tuple[float, float]:
    """(train, inference) samples per second of one model."""
    torch.manual_seed(0)
    model = MPSClassifier(sites, CLASSES, bond_dim=bond_dim, method=method).to(device)
    x = torch.rand(BATCH, sites, device=device)
    y = torch.randint(0, CLASSES, (BATCH,), device=device)
    train = samples_per_second(train_step(model, model, x, y), reps, device=device)
    infer = samples_per_second(inference_step(model, x), reps, device=device)
    return train, infer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sites", type=int, nargs="+", default=[784, 196])
    parser.add_argument("--bond-dims", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument(
        "--methods", nargs="+", default=["log_depth", "native"], help="compared with the scan"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"# chain methods on {name} (torch {torch.__version__}); batch {BATCH}; auto = log_depth for D <= {TREE_MAX_BOND_DIM} on accelerators"
    )
    others = [m for m in args.methods if m != "scan"]
    head = ["sites", "D", "train scan"]
    head += [c for m in others for c in (f"train {m}", f"{m}/scan")]
    head += ["infer scan"] + [c for m in others for c in (f"infer {m}", f"{m}/scan")]
    print("| " + " | ".join(head) + " |" if args.markdown else "  ".join(head))
    if args.markdown:
        print("|" + "---|" * len(head))
    for sites in args.sites:
        for d in args.bond_dims:
            speed = {m: measure(sites, d, m, device, args.reps) for m in ["scan", *others]}
            cells = [f"{sites}", f"{d}"]
            for i in (0, 1):  # train, inference
                cells.append(f"{speed['scan'][i]:,.0f}")
                for m in others:
                    cells += [f"{speed[m][i]:,.0f}", f"{speed[m][i] / speed['scan'][i]:.2f}x"]
            print(
                "| " + " | ".join(cells) + " |" if args.markdown else "  ".join(cells), flush=True
            )


if __name__ == "__main__":
    main()
