"""Samples per second of an MPS classifier with the two fast chain contractions, on one device.

    python benchmarks/chain_methods.py                      # CPU, 784 and 196 sites
    python benchmarks/chain_methods.py --device cuda        # the same on a GPU
    python benchmarks/chain_methods.py --markdown           # the table as markdown

``method="sweep"`` carries boundary vectors site by site (N/2 sequential steps of small batched
matmuls; D^2 work per site and sample); ``method="tree"`` multiplies the transfer matrices
pairwise in log depth (few, large kernels; D^3 work per site and sample). ``"auto"`` picks the
tree on an accelerator for D <= ``TREE_MAX_BOND_DIM`` and the sweep otherwise: this script is
how that threshold is checked. Models: ``MPSClassifier`` ([1, x] map, 10 classes, normalised
logits), batch 100, random inputs in [0, 1]. A training step is forward + cross-entropy + backward
+ Adam step; inference is a forward pass under ``torch.inference_mode``. Each figure is the
median of several timed repetitions after warm-up (CUDA: synchronised). Figures move from run to
run; the ratio column compares the two methods in the same run.
"""

from __future__ import annotations

import argparse

import torch
from contraction import BATCH, CLASSES, inference_step, samples_per_second, train_step

from tnkd.students import MPSClassifier
from tnkd.tn.contraction import TREE_MAX_BOND_DIM


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
    args = parser.parse_args()
    device = torch.device(args.device)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"# chain methods on {name} (torch {torch.__version__}); batch {BATCH}; auto = tree for D <= {TREE_MAX_BOND_DIM} on accelerators"
    )
    header = "| sites | D | train sweep | train tree | tree/sweep | infer sweep | infer tree | tree/sweep |"
    print(header if args.markdown else header.replace("|", " ").strip())
    if args.markdown:
        print("|" + "---|" * 8)
    for sites in args.sites:
        for d in args.bond_dims:
            sweep = measure(sites, d, "sweep", device, args.reps)
            tree = measure(sites, d, "tree", device, args.reps)
            cells = [
                f"{sites}",
                f"{d}",
                f"{sweep[0]:,.0f}",
                f"{tree[0]:,.0f}",
                f"{tree[0] / sweep[0]:.2f}x",
                f"{sweep[1]:,.0f}",
                f"{tree[1]:,.0f}",
                f"{tree[1] / sweep[1]:.2f}x",
            ]
            print(
                "| " + " | ".join(cells) + " |" if args.markdown else "  ".join(cells), flush=True
            )


if __name__ == "__main__":
    main()
