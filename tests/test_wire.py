"""Tensor <-> protobuf codecs: accuracy, odd inputs, wire format, and rejection of corrupt messages."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm._proto import swarm_pb2
from swarm.errors import ConfigError, LimitExceeded, ProtocolError
from swarm.wire import (
    CODEC_NAMES,
    decode_tensor,
    encode_tensor,
    encoded_nbytes,
    from_pb_dtype,
    parse_codec,
    raw_nbytes,
    to_pb_dtype,
)

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_DTYPES = [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool]
# Relative precision of each codec for normal-range values (half an ulp of the target format).
REL_TOL = {"none": 0.0, "fp16": 2.0**-11, "bf16": 2.0**-8}


def gaussian(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def roundtrip(t: torch.Tensor, codec: str, **kwargs: int) -> torch.Tensor:
    # Serialize and parse as gRPC would, so nothing can lean on the sender's message object.
    wire = encode_tensor(t, codec, **kwargs).SerializeToString()
    return decode_tensor(swarm_pb2.Tensor.FromString(wire))


def assert_int8_bounds(x: torch.Tensor, y: torch.Tensor, block_size: int) -> None:
    """Every element within absmax/127 of its block's absmax.

    Quantization alone is within absmax/254 (half a level), which float32 outputs must meet; fp16/bf16
    outputs add their own rounding (<= absmax/512) and must stay within absmax/127.
    """
    levels = 254 if x.dtype == torch.float32 else 127
    flat_x, flat_y = x.float().reshape(-1), y.float().reshape(-1)
    for lo in range(0, flat_x.numel(), block_size):
        block = flat_x[lo : lo + block_size]
        err = (block - flat_y[lo : lo + block_size]).abs().max()
        absmax = block.abs().max()
        assert err <= absmax / levels * (1 + 1e-5) + 1e-30, (lo, float(err), float(absmax))


# ------------------------------------------------------------------------------------ accuracy ---


@pytest.mark.parametrize("codec", ["none", "fp16", "bf16"])
def test_float_codecs_are_exact_or_within_half_an_ulp(codec: str) -> None:
    x = gaussian(64, 1000)
    y = roundtrip(x, codec)
    assert y.dtype == torch.float32 and y.shape == x.shape
    if codec == "none":
        assert torch.equal(x, y)
    else:
        assert torch.all((x - y).abs() <= REL_TOL[codec] * x.abs())


@pytest.mark.parametrize("block_size", [64, 1, 7, 100, 4096])
def test_int8_error_bounds_on_gaussian_data(block_size: int) -> None:
    x = gaussian(32, 1000, seed=1)
    y = roundtrip(x, "int8", block_size=block_size)
    assert float((x - y).norm() / x.norm()) <= 0.01
    assert_int8_bounds(x, y, block_size)


def test_int8_wire_format_is_values_then_float32_absmax() -> None:
    """Pins the byte layout so other implementations can interoperate."""
    x = torch.tensor([1.0, -2.0, 0.5, 4.0, -1.0])
    msg = encode_tensor(x, "int8", block_size=3)
    assert (msg.codec, msg.block_size, list(msg.shape)) == (swarm_pb2.CODEC_INT8_BLOCKWISE, 3, [5])
    q = np.frombuffer(msg.data, dtype=np.int8, count=5)
    absmax = np.frombuffer(msg.data, dtype="<f4", offset=5)
    assert absmax.tolist() == [2.0, 4.0]
    assert q.tolist() == [64, -127, 32, 127, -32]  # round(x * 127 / absmax), half to even


@pytest.mark.parametrize("codec", list(CODEC_NAMES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_come_back_in_their_dtype(codec: str, dtype: torch.dtype) -> None:
    x = gaussian(5, 77, dtype=dtype)
    y = roundtrip(x, codec)
    assert y.dtype == dtype
    native = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    if codec == "int8":
        assert float((x.float() - y.float()).norm() / x.float().norm()) <= 0.01
    elif codec in ("none", native) or (codec, dtype) == ("fp16", torch.bfloat16):
        assert torch.equal(x, y)  # bf16 -> fp16 keeps all 8 bits of mantissa for Gaussian values
    else:  # fp16 -> bf16 rounds to 8 bits
        assert torch.allclose(x.float(), y.float(), rtol=2.0**-8)


@pytest.mark.parametrize("codec", list(CODEC_NAMES))
@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_integer_tensors_always_travel_uncompressed(codec: str, dtype: torch.dtype) -> None:
    x = torch.randint(0, 2 if dtype == torch.bool else 100, (3, 17)).to(dtype)
    msg = encode_tensor(x, codec)
    assert msg.codec == swarm_pb2.CODEC_NONE and msg.block_size == 0
    y = decode_tensor(msg)
    assert y.dtype == dtype and torch.equal(x, y)


# --------------------------------------------------------------------------------- odd inputs ---


@pytest.mark.parametrize("codec", list(CODEC_NAMES))
@pytest.mark.parametrize("shape", [(3, 7, 5), (1,), (), (105,), (2, 1, 1, 33)])
def test_odd_shapes(codec: str, shape: tuple[int, ...]) -> None:
    x = gaussian(*shape, seed=2)
    y = roundtrip(x, codec, block_size=64)
    assert y.shape == x.shape and y.dtype == x.dtype
    if codec == "int8":
        assert_int8_bounds(x, y, 64)
    else:
        assert torch.all((x - y).abs() <= REL_TOL[codec] * x.abs())


@pytest.mark.parametrize("codec", list(CODEC_NAMES))
@pytest.mark.parametrize("shape", [(0,), (3, 0, 5), (0, 4096)])
def test_empty_tensors(codec: str, shape: tuple[int, ...]) -> None:
    y = roundtrip(torch.empty(shape), codec)
    assert y.shape == shape and y.dtype == torch.float32


@pytest.mark.parametrize("codec", list(CODEC_NAMES))
@pytest.mark.parametrize(
    "make",
    [
        lambda x: x.t(),  # transposed
        lambda x: x[::3, 1::2],  # strided slice
        lambda x: x[:, 5],  # column: stride != 1
        lambda x: x[0].expand(4, -1),  # stride 0
    ],
    ids=["transposed", "sliced", "column", "expanded"],
)
def test_non_contiguous_inputs(codec: str, make: object) -> None:
    assert callable(make)
    x = make(gaussian(40, 70, seed=3))
    assert not x.is_contiguous()
    y = roundtrip(x, codec)
    assert y.is_contiguous() and y.shape == x.shape
    expected = roundtrip(x.contiguous(), codec)
    assert torch.equal(y, expected)


def test_all_zero_blocks_decode_to_zeros_not_nan() -> None:
    x = gaussian(4, 64)
    x[1] = 0.0
    x[3, :10] = 0.0
    y = roundtrip(x, "int8", block_size=64)
    assert not torch.isnan(y).any()
    assert torch.equal(y[1], torch.zeros(64))
    assert torch.equal(roundtrip(torch.zeros(1000), "int8"), torch.zeros(1000))


def test_tiny_and_huge_magnitudes_survive_int8() -> None:
    x = torch.cat([gaussian(64) * 1e-30, gaussian(64, seed=1) * 1e30])
    y = roundtrip(x, "int8")
    assert torch.isfinite(y).all()
    assert_int8_bounds(x, y, 64)


def test_int8_refuses_non_finite_values_but_other_codecs_carry_them() -> None:
    x = torch.tensor([1.0, float("nan"), float("inf"), -2.0])
    with pytest.raises(ProtocolError, match="NaN or inf"):
        encode_tensor(x, "int8")
    y = roundtrip(x, "none")
    assert torch.equal(y.isnan(), x.isnan()) and y[2] == math.inf


def test_decoded_tensor_is_writable_and_independent_of_the_message() -> None:
    msg = encode_tensor(gaussian(1 << 20), "int8")  # large enough to use the buffer cache
    a, b = decode_tensor(msg), decode_tensor(msg)
    snapshot = b.clone()
    a.fill_(7.0)  # writable, and does not alias b
    assert torch.equal(b, snapshot)
    del a
    c = decode_tensor(encode_tensor(torch.zeros(1 << 20), "int8"))  # may reuse a's buffer, never b's
    assert torch.equal(b, snapshot) and torch.equal(c, torch.zeros(1 << 20))


def test_encode_accepts_tensors_that_require_grad() -> None:
    x = gaussian(3, 4).requires_grad_()
    y = roundtrip(x, "none")
    assert torch.equal(x.detach(), y) and not y.requires_grad


# ---------------------------------------------------------------------------------- metadata ---


def test_codec_names() -> None:
    assert parse_codec("int8") == swarm_pb2.CODEC_INT8_BLOCKWISE
    assert parse_codec(" FP16 ") == swarm_pb2.CODEC_FLOAT16
    assert {parse_codec(n) for n in CODEC_NAMES} == set(CODEC_NAMES.values())
    with pytest.raises(ValueError, match="none, fp16, bf16, int8") as info:
        parse_codec("int4")
    assert isinstance(info.value, ConfigError)
    with pytest.raises(ConfigError, match="unknown codec value 42"):
        encode_tensor(torch.ones(2), 42)
    with pytest.raises(ConfigError, match="block_size"):
        encode_tensor(torch.ones(2), "int8", block_size=0)


def test_dtype_mapping_round_trips_and_rejects_the_rest() -> None:
    for dtype in FLOAT_DTYPES + INT_DTYPES:
        assert from_pb_dtype(to_pb_dtype(dtype)) == dtype
    with pytest.raises(ProtocolError, match=r"float64 cannot be sent.*float32"):
        to_pb_dtype(torch.float64)
    with pytest.raises(ProtocolError, match="unknown tensor dtype 0"):
        from_pb_dtype(swarm_pb2.DTYPE_UNSPECIFIED)


def test_byte_counts_for_metrics() -> None:
    x = gaussian(1000)
    msg = encode_tensor(x, "int8")
    assert raw_nbytes(x) == 4000
    assert encoded_nbytes(msg) == len(msg.SerializeToString())
    assert 1000 + 4 * 16 <= encoded_nbytes(msg) < 1000 + 4 * 16 + 16
    assert 4.0 / (encoded_nbytes(encode_tensor(gaussian(1 << 16), "int8")) / (1 << 16)) >= 3.5


def test_message_equals_a_plainly_built_one() -> None:
    """The single-copy serializer must produce exactly what setting the fields would."""
    x = gaussian(7, 300)
    for codec, data in [("none", x.numpy().tobytes()), ("fp16", x.half().numpy().tobytes())]:
        expected = swarm_pb2.Tensor(data=data, shape=[7, 300], dtype=swarm_pb2.DTYPE_FLOAT32)
        expected.codec = CODEC_NAMES[codec]  # type: ignore[assignment]
        assert encode_tensor(x, codec) == expected
    big = encode_tensor(gaussian(1 << 18), "none")  # multi-byte length prefix, cached buffer
    assert big.data == gaussian(1 << 18).numpy().tobytes()


# ------------------------------------------------------------------------------ corrupt input ---


def test_rejects_wrong_data_length() -> None:
    msg = encode_tensor(gaussian(10, 10), "int8")
    for data, got in [(msg.data[:-1], len(msg.data) - 1), (msg.data + b"\0", len(msg.data) + 1), (b"", 0)]:
        bad = swarm_pb2.Tensor()
        bad.CopyFrom(msg)
        bad.data = data
        with pytest.raises(
            ProtocolError, match=rf"must carry {len(msg.data)} bytes of data, got {got} bytes"
        ):
            decode_tensor(bad)


def _msg(shape: list[int] | None = None, **fields: int) -> swarm_pb2.Tensor:
    msg = encode_tensor(gaussian(2, 3), "none")
    if shape is not None:
        del msg.shape[:]
        msg.shape.extend(shape)
    for name, value in fields.items():
        setattr(msg, name, value)
    return msg


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"codec": 99}, r"unknown tensor codec 99"),
        ({"dtype": 99}, r"unknown tensor dtype 99"),
        ({"dtype": 0}, r"unknown tensor dtype 0"),
        ({"shape": [-2, -3]}, r"invalid tensor shape \[-2, -3\]"),
        ({"shape": [1] * 40}, r"at most 32 dims"),
        ({"codec": swarm_pb2.CODEC_INT8_BLOCKWISE, "block_size": 0}, r"block_size > 0"),
        ({"codec": swarm_pb2.CODEC_FLOAT16, "dtype": swarm_pb2.DTYPE_INT64}, r"floating tensors only"),
        ({"shape": [2**40, 2**40]}, r"must carry \d+ bytes"),  # no allocation is attempted
    ],
)
def test_rejects_malformed_headers(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_tensor(_msg(**fields))


def test_rejects_too_many_elements_before_allocating() -> None:
    msg = _msg(shape=[10**6, 10**6])  # would be 4 TB: must fail on the header alone
    with pytest.raises(LimitExceeded, match=r"RESOURCE limit exceeded.*10\d+ elements.*at most 4096") as info:
        decode_tensor(msg, max_elements=4096)
    assert isinstance(info.value, ProtocolError)
    assert decode_tensor(encode_tensor(gaussian(64, 64), "none"), max_elements=4096).numel() == 4096


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -1.0])
def test_rejects_corrupt_int8_scales(scale: float) -> None:
    msg = encode_tensor(gaussian(128), "int8", block_size=64)
    msg.data = msg.data[:-4] + np.array([scale], dtype="<f4").tobytes()
    with pytest.raises(ProtocolError, match="scales must be finite and >= 0"):
        decode_tensor(msg)


def test_bool_bytes_other_than_0_and_1_are_normalised() -> None:
    msg = encode_tensor(torch.tensor([True, False, True]), "none")
    msg.data = bytes([2, 0, 255])
    assert decode_tensor(msg).tolist() == [True, False, True]


# -------------------------------------------------------------------------------- properties ---


@settings(max_examples=150, deadline=None)
@given(
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=4),
    dtype=st.sampled_from(FLOAT_DTYPES + INT_DTYPES),
    codec=st.sampled_from(list(CODEC_NAMES)),
    block_size=st.integers(1, 100),
    seed=st.integers(0, 2**16),
)
def test_roundtrip_property(
    shape: list[int], dtype: torch.dtype, codec: str, block_size: int, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        x = (torch.randn(shape, generator=gen) * 10).to(dtype)
    else:
        x = torch.randint(0, 2 if dtype == torch.bool else 100, shape, generator=gen).to(dtype)
    y = roundtrip(x, codec, block_size=block_size)
    assert y.shape == x.shape and y.dtype == x.dtype
    if not dtype.is_floating_point or codec == "none":
        assert torch.equal(x, y)
    elif codec == "int8":
        assert_int8_bounds(x, y, block_size)
    else:
        assert torch.allclose(x.float(), y.float(), rtol=2.0**-8, atol=1e-4)
