"""The chain scan as native CPU loops: ``csrc/chain_scan.cpp``, compiled on first use.

:func:`tnkd.tn.chain.sweep_boundary`'s ``"scan"`` runs its steps from Python, two ATen kernels
per step (an outer product and a batched matmul), and at small bond dimensions those kernels'
dispatch, not their arithmetic, sets the time: a step at D = 10 is about 80,000 multiply-adds
for two chains and a batch of 100, a few microseconds of work. ``"native"`` runs the same math
(the same steps, renormalisations and hand-written backward pass) as one C++ function per pass:
every step is an outer product into an L1-resident scratch and a register-tiled matrix product
along the batch (the long, contiguous axis), and the K chains run on parallel threads. For an
MPS the merge of site pairs, the block features and the output core are native too, so that
:func:`tnkd.tn.chain.contract_chain` is one autograd node.

The source is compiled with ``torch.utils.cpp_extension.load`` (g++ and ninja) the first time a
native scan runs, about 30 s, into torch's extension cache (``~/.cache/torch_extensions``,
or ``TORCH_EXTENSIONS_DIR``), so later processes load it in about a second. The build is
specific to the CPU (``-march=native``); the CPU's model and flags are part of the extension's
name, so a cache shared between different machines never loads a foreign build. If it cannot
be built (no compiler, no ninja), :func:`kernels` warns once and returns ``None``, and the
chain contraction uses the Python scan instead.

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

SOURCE = Path(__file__).parent / "csrc" / "chain_scan.cpp"
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


def _build_name() -> str:
    text = SOURCE.read_text() + " ".join(FLAGS) + _cpu_id() + torch.__version__
    return "tnkd_chain_scan_" + hashlib.sha1(text.encode()).hexdigest()[:12]


def kernels() -> ModuleType | None:
    """The compiled module (``scan_forward``, ``scan_backward``), or ``None`` if it cannot be built.

    Builds once per process (and once per machine: later processes load the cached build); a
    failed build warns once and is not retried.
    """
    if "ext" not in _STATE:
        try:
            from torch.utils.cpp_extension import load

            _STATE["ext"] = load(
                name=_build_name(),
                sources=[str(SOURCE)],
                extra_cflags=FLAGS,
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        except Exception as err:  # any build failure means: use the Python scan
            _STATE["ext"] = None
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            warnings.warn(
                f"tnkd: the native chain scan could not be compiled ({first}); "
                "using the Python scan (method='scan') instead",
                RuntimeWarning,
                stacklevel=2,
            )
    return _STATE["ext"]


def supports(tensor: torch.Tensor) -> bool:
    """Whether the native kernels take this tensor: float32 or float64 on the CPU."""
    return tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float64)
