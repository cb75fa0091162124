"""Read and write IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number ``0x00 0x00 <dtype code> <ndim>``, then ``ndim``
big-endian ``uint32`` dimensions, then the data in C order, big-endian (LeCun et al.,
http://yann.lecun.com/exdb/mnist/). The dtype codes are ``0x08`` uint8, ``0x09`` int8,
``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32 and ``0x0E`` float64. Files are often
gzip-compressed; :func:`read_idx` recognises that by the gzip magic bytes, whatever the name.

Example:
    >>> import numpy as np, tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "labels-idx1-ubyte.gz"
    >>> _ = write_idx(path, np.array([5, 0, 4], dtype=np.uint8))
    >>> read_idx(path)
    array([5, 0, 4], dtype=uint8)
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

GZIP_MAGIC = b"\x1f\x8b"

# IDX dtype code -> big-endian numpy dtype, as the format defines them.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_OF_KIND = {(dtype.kind, dtype.itemsize): code for code, dtype in IDX_DTYPES.items()}


def _read_bytes(path: Path) -> bytes:
    """The file's content, decompressed when it starts with the gzip magic bytes."""
    with path.open("rb") as f:
        compressed = f.read(2) == GZIP_MAGIC
    if not compressed:
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, OSError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: corrupt or truncated gzip data ({err})") from err


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not) into a numpy array.

    Args:
        path: the file; compression is detected from its first bytes, not from its name.

    Returns:
        A writable array in native byte order with the dtype and shape the header gives,
        e.g. ``uint8`` of shape ``(60000, 28, 28)`` for the MNIST training images.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the header is not a valid IDX header (magic number, dtype code,
            number of dimensions) or the data size does not match the dimensions (a
            truncated or corrupt file); the message names the file and what is wrong.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(
            f"{path}: not an IDX file: {len(data)} bytes, shorter than the 4-byte magic number"
        )
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise ValueError(
            f"{path}: not an IDX file: magic number 0x{data[:4].hex()} "
            "should start with two zero bytes"
        )
    if code not in IDX_DTYPES:
        valid = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise ValueError(f"{path}: unknown IDX dtype code 0x{code:02X}; expected one of {valid}")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header gives 0 dimensions; expected at least 1")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(
            f"{path}: truncated IDX header: {ndim} dimensions need {header_size} bytes, "
            f"but the file holds {len(data)}"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    dtype = IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    actual = len(data) - header_size
    if actual != expected:
        problem = "truncated" if actual < expected else "corrupt (extra bytes after the data)"
        raise ValueError(
            f"{path}: {problem}: the header gives shape {shape} of {dtype.newbyteorder('=')}, "
            f"i.e. {expected} data bytes, but the file holds {actual}"
        )
    flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=header_size)
    # One copy into native byte order: the result is writable and owns its memory.
    return flat.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def read_idx_tensor(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an IDX file into a torch tensor; see :func:`read_idx` (same checks and errors).

    Args:
        path: the file, gzip-compressed or not.

    Returns:
        A CPU tensor with the file's dtype (e.g. ``torch.uint8``) and shape.
    """
    return torch.from_numpy(read_idx(path))


def write_idx(
    path: str | os.PathLike[str],
    array: np.ndarray | torch.Tensor,
    compress: bool | None = None,
) -> Path:
    """Write an array as an IDX file.

    Args:
        path: where to write; its folder must exist. An existing file is replaced.
        array: the data, with at least one dimension and a dtype IDX can hold (uint8,
            int8, int16, int32, float32 or float64). A tensor is moved to the CPU first.
        compress: gzip the file; ``None`` (default) compresses when the name ends in ``.gz``.
            The gzip header holds no time stamp, so equal arrays give equal files.

    Returns:
        The path written.

    Raises:
        ValueError: if the array has no dimensions, a dimension too large for IDX, or a
            dtype that IDX cannot hold.
    """
    path = Path(path)
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    code = _CODE_OF_KIND.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        valid = ", ".join(str(dtype.newbyteorder("=")) for dtype in IDX_DTYPES.values())
        raise ValueError(f"IDX cannot hold dtype {array.dtype}; expected one of {valid}")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX needs an array with 1 to 255 dimensions, but got {array.ndim}")
    if max(array.shape) >= 2**32:
        raise ValueError(f"IDX dimensions must be below 2**32, but got shape {array.shape}")
    header = struct.pack(f">BBBB{array.ndim}I", 0, 0, code, array.ndim, *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    if compress is None:
        compress = path.name.endswith(".gz")
    path.write_bytes(gzip.compress(payload, mtime=0) if compress else payload)
    return path
