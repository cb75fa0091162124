"""Every speed figure of issue 19 in one run: chains at every D, the Lightning epoch, a batched grid.

    python benchmarks/speed.py                         # all three parts, torch's threads
    python benchmarks/speed.py --quick                 # shorter: 2 chain rows, 2 epochs, 5-epoch grid
    python benchmarks/speed.py --threads 1 --clock cpu # one thread, CPU time (a shared machine)
    python benchmarks/speed.py --device cuda           # on a GPU (chains, epoch and grid)

It runs, one after another and each in its own process (so that no part warms the caches or
the allocator of the next):

1. ``benchmarks/chain_speed.py``: MPS training and inference samples/s at 784 sites (D = 10,
   16, 20, 50) and 196 sites (D = 8, 16, 32) for "today" (``method="scan"``, the Python
   fallback), "new" (``method="auto"``) and TensorKrowch's ``MPSLayer``, with the ratios;
2. ``benchmarks/end_to_end.py``: a Lightning training epoch of the MNIST D = 8 MPS student
   against the raw step, and the epoch as it was before (the floor: raw / epoch <= 1.3);
3. ``benchmarks/batched_grid.py``: the 12-run digits grid as one batched model against one of
   its runs alone (the floor: <= 3x), one CPU thread as the floor asks (on the GPU with
   ``--device cuda``); needs the digits teacher (``tnkd compare --config
   configs/digits/main.yaml`` trains it).

Each part prints its own tables; this script prints a header per part and the wall time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parts(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The three benchmark commands for these arguments."""
    common = ["--clock", args.clock] + (["--threads", str(args.threads)] if args.threads else [])
    chain = [str(HERE / "chain_speed.py"), "--markdown", "--device", args.device, *common]
    epoch = [str(HERE / "end_to_end.py"), "--device", args.device, "--root", args.root, *common]
    accelerator = "cpu" if args.device == "cpu" else "gpu"
    grid = [str(HERE / "batched_grid.py"), "--teacher", args.teacher, "--accelerator", accelerator]
    if args.quick:
        chain.append("--quick")
        epoch += ["--rounds", "2"]
        grid += ["--epochs", "5"]
    return [
        ("1. Chains at every bond dimension (chain_speed.py)", chain),
        ("2. A Lightning epoch against the raw step (end_to_end.py)", epoch),
        ("3. A 12-run grid as one batched model (batched_grid.py)", grid),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="shorter versions of each part")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (chains, epoch)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (every part)")
    parser.add_argument("--root", default="../shared/datasets", help="folder with MNIST/raw")
    parser.add_argument("--teacher", default="runs/teachers/digits_cnn.pt")
    parser.add_argument("--skip", type=int, nargs="*", default=[], help="part numbers to skip")
    args = parser.parse_args()
    failed = []
    for number, (title, command) in enumerate(parts(args), start=1):
        if number in args.skip:
            continue
        print(f"\n## {title}\n", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, *command])
        print(f"\n({time.perf_counter() - start:.0f} s)", flush=True)
        if code:
            failed.append(f"part {number} exited with {code}")
    if failed:
        sys.exit("; ".join(failed))


if __name__ == "__main__":
    main()
