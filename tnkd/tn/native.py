"""Native CPU loops compiled on first use: the chain scan and the tree's levels.

Two C++ sources, one loader (:func:`kernels`, by name, :data:`SOURCES`):

- ``"chain_scan"`` (``csrc/chain_scan.cpp``): the boundary-vector scan of :mod:`tnkd.tn.chain`
  (``method="native"``), with the same steps, renormalisations and hand-written backward pass as
  its Python scan; for an MPS the merge of site pairs, the block features and the output core
  too, so that :func:`tnkd.tn.chain.contract_chain` is one autograd node;
- ``"tree_levels"`` (``csrc/tree_levels.cpp``): the level loop of a binary tree,
  :class:`tnkd.tn.fused.FastTree`, forward and backward.

At small bond dimensions a loop of ATen kernels run from Python is timed by their dispatch, not
their arithmetic (a chain step at D = 10 for a batch of 100 is a few microseconds of work). The
native loops run a whole pass as one C++ call: every step an outer product into an L1-resident
scratch and a register-tiled matrix product along the batch (the long, contiguous axis;
``csrc/simd.h``), independent chains or subtrees on parallel threads.

Each source is compiled with ``torch.utils.cpp_extension.load`` (g++ and ninja) the first time
it is needed, about 30 s, into torch's extension cache (``~/.cache/torch_extensions``,
or ``TORCH_EXTENSIONS_DIR``), so later processes load it in about a second. The build is
specific to the CPU (``-march=native``); the CPU's model and flags are part of the extension's
name, so a cache shared between different machines never loads a foreign build. If one cannot
be built (no compiler, no ninja), :func:`kernels` warns once and returns ``None``, and the
caller runs without it (the chain's ``"scan"``; the tree's stable engine).

Example:
    >>> ext = kernels()  # compiles on first use
    >>> ext is None or callable(ext.scan_forward)
    True
"""

import hashlib
import platform
import warnings
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).parent / "csrc"
#: the native sources by name, and what runs instead when one cannot be built
SOURCES = {
    "chain_scan": (CSRC / "chain_scan.cpp", "the Python scan (method='scan')"),
    "tree_levels": (CSRC / "tree_levels.cpp", "the stable engine"),
}
FLAGS = ["-O3", "-march=native", "-fopenmp"]

_STATE: dict[str, ModuleType | None] = {}


def _cpu_id() -> str:
    """The CPU's model and instruction-set flags (what ``-march=native`` compiles for)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _build_name(name: str) -> str:
    source = SOURCES[name][0]
    headers = "".join(h.read_text() for h in sorted(source.parent.glob("*.h")))
    # the checkout's folder too: two checkouts (or virtual environments) on one machine keep a
    # build each instead of rebuilding the shared one whenever the other was used last
    where = str(source.parent.resolve())
    text = source.read_text() + headers + " ".join(FLAGS) + _cpu_id() + torch.__version__ + where
    return f"tnkd_{name}_" + hashlib.sha1(text.encode()).hexdigest()[:12]


def kernels(name: str = "chain_scan") -> ModuleType | None:
    """The compiled module ``name`` (a key of :data:`SOURCES`), or ``None`` if it cannot be built.

    ``"chain_scan"``: ``scan_forward``, ``scan_backward``, ...; ``"tree_levels"``:
    ``tree_forward``, ``tree_backward``. A failed build is not retried in this process.
    """
    if name not in SOURCES:
        raise ValueError(f"native kernels are one of {tuple(SOURCES)}, but got {name!r}")
    if name not in _STATE:
        source, instead = SOURCES[name]
        try:
            from torch.utils.cpp_extension import load

            _STATE[name] = load(
                name=_build_name(name),
                sources=[str(source)],
                extra_cflags=FLAGS,
                extra_ldflags=["-fopenmp"],
            )
        except Exception as err:  # any build failure means: run without it
            _STATE[name] = None
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            warnings.warn(
                f"tnkd: the native {name.replace('_', ' ')} could not be compiled ({first}); "
                f"using {instead} instead",
                RuntimeWarning,
                stacklevel=2,
            )
    return _STATE[name]


def supports(tensor: torch.Tensor) -> bool:
    """Whether the native kernels take this tensor: float32 or float64 on the CPU."""
    return tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float64)
