import gzip
import struct

import numpy as np
import pytest
import torch

from tnkd.data.idx import read_idx, read_idx_tensor, write_idx

DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


def _sample(dtype, shape):
    values = np.arange(np.prod(shape)).reshape(shape) - 3
    return (values % 100 if dtype == np.uint8 else values).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5,), (3, 4, 2)])
@pytest.mark.parametrize("compress", [False, True])
def test_round_trip(tmp_path, dtype, shape, compress):
    array = _sample(dtype, shape)
    path = write_idx(tmp_path / "a.idx", array, compress=compress)
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.shape == shape
    np.testing.assert_array_equal(back, array)
    assert back.flags.writeable and back.dtype.isnative


def test_reads_hand_made_bytes(tmp_path):
    # Independent of write_idx: the header and big-endian data written with struct.
    raw = struct.pack(">BBBB2I", 0, 0, 0x0B, 2, 2, 3) + struct.pack(">6h", 1, -2, 300, 4, 5, -600)
    (tmp_path / "h").write_bytes(raw)
    np.testing.assert_array_equal(read_idx(tmp_path / "h"), [[1, -2, 300], [4, 5, -600]])
    floats = struct.pack(">BBBB1I", 0, 0, 0x0D, 1, 2) + struct.pack(">2f", 0.5, -1.25)
    (tmp_path / "f").write_bytes(floats)
    np.testing.assert_array_equal(read_idx(tmp_path / "f"), np.array([0.5, -1.25], np.float32))


def test_writer_matches_the_format(tmp_path):
    path = write_idx(tmp_path / "labels", np.array([5, 0, 4], dtype=np.uint8))
    assert path.read_bytes() == b"\x00\x00\x08\x01\x00\x00\x00\x03\x05\x00\x04"


def test_compression_by_name_and_deterministic(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    gz, plain = write_idx(tmp_path / "x.gz", array), write_idx(tmp_path / "x", array)
    assert gz.read_bytes()[:2] == b"\x1f\x8b" and plain.read_bytes()[:2] == b"\x00\x00"
    assert gzip.decompress(gz.read_bytes()) == plain.read_bytes()
    assert write_idx(tmp_path / "y.gz", array).read_bytes() == gz.read_bytes()


def test_gzip_detected_by_content_not_name(tmp_path):
    array = np.arange(6, dtype=np.int32)
    np.testing.assert_array_equal(
        read_idx(write_idx(tmp_path / "plain.gz", array, compress=False)), array
    )
    np.testing.assert_array_equal(
        read_idx(write_idx(tmp_path / "packed", array, compress=True)), array
    )


def test_tensor_reader(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    tensor = read_idx_tensor(write_idx(tmp_path / "t.gz", torch.from_numpy(array)))
    assert tensor.dtype == torch.uint8 and tensor.shape == (2, 3, 4)
    assert torch.equal(tensor, torch.from_numpy(array))


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"\x00\x00", "shorter than the 4-byte magic"),
        (b"\x01\x02\x08\x01\x00\x00\x00\x01\x07", "should start with two zero bytes"),
        (b"\x00\x00\x0a\x01\x00\x00\x00\x01\x07", "unknown IDX dtype code 0x0A"),
        (b"\x00\x00\x08\x00\x07", "0 dimensions"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x01\x00\x00", "truncated IDX header"),
    ],
)
@pytest.mark.parametrize("compress", [False, True])
def test_corrupt_header(tmp_path, raw, match, compress):
    path = tmp_path / "bad"
    path.write_bytes(gzip.compress(raw) if compress else raw)
    with pytest.raises(ValueError, match=match) as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_data(tmp_path, compress):
    path = write_idx(tmp_path / "images", np.zeros((4, 28, 28), np.uint8))
    raw = path.read_bytes()[:-10]
    path.write_bytes(gzip.compress(raw) if compress else raw)
    with pytest.raises(
        ValueError, match=r"truncated.*shape \(4, 28, 28\).*3136 data bytes.*3126"
    ) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_extra_bytes(tmp_path):
    path = write_idx(tmp_path / "labels", np.zeros(3, np.uint8))
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(ValueError, match="extra bytes"):
        read_idx(path)


def test_truncated_gzip_stream(tmp_path):
    path = write_idx(tmp_path / "x.gz", np.arange(1000, dtype=np.int32))
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match="corrupt or truncated gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope")


@pytest.mark.parametrize(
    "array", [np.zeros(3, np.uint16), np.zeros(3, bool), np.zeros(3, np.int64)]
)
def test_writer_rejects_dtypes(tmp_path, array):
    with pytest.raises(ValueError, match="IDX cannot hold dtype"):
        write_idx(tmp_path / "x", array)


def test_writer_rejects_scalars(tmp_path):
    with pytest.raises(ValueError, match="1 to 255 dimensions"):
        write_idx(tmp_path / "x", np.uint8(3))
