"""A copy of tnkd at an earlier commit, importable beside today's as ``tnkd_base``.

    python benchmarks/baseline.py 0ec9286        # writes runs/baseline/tnkd_base (from git)

Speed claims of a refactor compare today's code with the commit before it, in the same process
and the same rounds (the machine's load falls on both alike). This writes that commit's
``tnkd/`` package with every ``tnkd`` import renamed, so a benchmark can do::

    sys.path.insert(0, "runs/baseline")
    import tnkd_base.students as base_students

The native sources keep their build names (a hash of the sources): where they did not change,
both packages load the same compiled kernels.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from pathlib import Path

OUT = Path("runs/baseline")


def materialise(rev: str, out: Path = OUT) -> Path:
    """Write ``out/tnkd_base`` from ``git archive REV tnkd`` with its imports renamed."""
    root = Path(subprocess.check_output(["git", "rev-parse", "--show-toplevel"], text=True).strip())
    target = out / "tnkd_base"
    if target.exists():
        shutil.rmtree(target)
    files = subprocess.check_output(
        ["git", "ls-tree", "-r", "--name-only", rev, "tnkd"], cwd=root, text=True
    )
    for name in files.split():
        data = subprocess.check_output(["git", "show", f"{rev}:{name}"], cwd=root)
        path = target / Path(name).relative_to("tnkd")
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".py"):
            text = re.sub(r"\btnkd\.", "tnkd_base.", data.decode())
            text = re.sub(r"^(\s*)(from|import) tnkd\b", r"\1\2 tnkd_base", text, flags=re.M)
            path.write_text(text)
        else:
            path.write_bytes(data)
    (out / "REV").write_text(
        subprocess.check_output(["git", "rev-parse", rev], cwd=root, text=True)
    )
    return target


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("rev", help="the commit to compare against")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    print(materialise(args.rev, Path(args.out)))


if __name__ == "__main__":
    main()
