"""Tensors <-> `swarm.v1.Tensor` messages, with the wire codecs.

Codecs (the decoded tensor always has the message's `dtype`, i.e. the sender's original dtype):

- ``none``: raw little-endian bytes of `dtype`; lossless, used for every integer/bool tensor.
- ``fp16`` / ``bf16``: IEEE half / bfloat16. fp16 overflows to ±inf beyond ±65504; bf16 keeps the
  float32 range with ~3 significant digits.
- ``int8``: blockwise absmax quantization. The flattened tensor is cut into blocks of `block_size`
  elements (the last one may be shorter). Per block b: ``absmax_b = max |x|``, ``q = round(x * 127 /
  absmax_b)`` as int8. `data` is the ``numel`` int8 values followed by one little-endian float32
  ``absmax_b`` per block, so ``x̂ = q * absmax_b / 127`` and ``|x - x̂| <= absmax_b / 254``.

`decode_tensor` validates a message completely before it allocates anything.

Speed (see bench/codecs.py): on CPU these codecs are memory-bound, so the code counts passes over
memory. Work is done in cache-sized chunks; `encode_tensor` writes the payload straight into a
serialized message, so protobuf copies it once instead of twice; and multi-MiB buffers come from a
small cache (`_BufferCache`), because a fresh one costs a page fault per page, more than the codec.
"""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from collections import deque
from collections.abc import Callable
from typing import Final, cast

import numpy as np
import torch

from swarm._proto import swarm_pb2
from swarm.errors import ConfigError, LimitExceeded, ProtocolError

__all__ = [
    "CODEC_NAMES",
    "DEFAULT_BLOCK_SIZE",
    "codec_label",
    "decode_tensor",
    "encode_tensor",
    "encoded_nbytes",
    "from_pb_dtype",
    "parse_codec",
    "raw_nbytes",
    "to_pb_dtype",
]

CODEC_NAMES: Final[dict[str, int]] = {
    "none": swarm_pb2.CODEC_NONE,
    "fp16": swarm_pb2.CODEC_FLOAT16,
    "bf16": swarm_pb2.CODEC_BFLOAT16,
    "int8": swarm_pb2.CODEC_INT8_BLOCKWISE,
}
_CODEC_LABELS: Final[dict[int, str]] = {v: k for k, v in CODEC_NAMES.items()}

DEFAULT_BLOCK_SIZE: Final = 64
_INT8_LEVELS: Final = 127.0
_MAX_BLOCK_SIZE: Final = 2**32 - 1  # Tensor.block_size is a uint32
_MAX_NDIM: Final = 32
_DATA_TAG: Final = b"\x0a"  # protobuf key of Tensor.data: field 1, wire type 2 (length-delimited)
_ALIGN: Final = 16  # numpy's allocations are 16-byte aligned
_CACHE_GRANULE: Final = 2 << 20  # cached buffer sizes are rounded up to huge pages
# 2**20 float32 elements = 4 MiB: several such temporaries stay in the L3 cache, and the slices are
# still large enough for torch's intra-op threads to pay off.
_CHUNK_ELEMENTS: Final = 1 << 20
# Below this many payload bytes (a decoding step's hidden states: a few KiB) the tricks above cost
# more than they save; plain `bytes` are quicker (encode 30 -> 7 us, decode 17 -> 7 us, 2 KiB).
_SMALL_BYTES: Final = 64 << 10

_DTYPE_TO_PB: Final[dict[torch.dtype, int]] = {
    torch.float32: swarm_pb2.DTYPE_FLOAT32,
    torch.float16: swarm_pb2.DTYPE_FLOAT16,
    torch.bfloat16: swarm_pb2.DTYPE_BFLOAT16,
    torch.int64: swarm_pb2.DTYPE_INT64,
    torch.int32: swarm_pb2.DTYPE_INT32,
    torch.int8: swarm_pb2.DTYPE_INT8,
    torch.uint8: swarm_pb2.DTYPE_UINT8,
    torch.bool: swarm_pb2.DTYPE_BOOL,
}
_PB_TO_DTYPE: Final[dict[int, torch.dtype]] = {v: k for k, v in _DTYPE_TO_PB.items()}
_HALF_CODEC_DTYPE: Final[dict[int, torch.dtype]] = {
    swarm_pb2.CODEC_FLOAT16: torch.float16,
    swarm_pb2.CODEC_BFLOAT16: torch.bfloat16,
}


def _consume_frombuffer_warning() -> None:
    """Decoding reads `bytes` through zero-copy read-only views that it never writes to (every decoded
    tensor is freshly allocated). torch warns about such views once per process; spend that warning
    here, silenced, instead of surprising a user at their first decode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.frombuffer(b"\0", dtype=torch.uint8)


_consume_frombuffer_warning()


# ---------------------------------------------------------------------------------------- names ---


def parse_codec(name: str) -> int:
    """'int8' -> swarm_pb2.CODEC_INT8_BLOCKWISE; raises ConfigError (a ValueError) naming valid codecs."""
    try:
        return CODEC_NAMES[name.strip().lower()]
    except KeyError:
        raise ConfigError(f"unknown codec {name!r}; choose one of {', '.join(CODEC_NAMES)}") from None


def codec_label(codec: int) -> str:
    """swarm_pb2 codec value -> its short name ('int8'), or 'unknown(N)'."""
    return _CODEC_LABELS.get(codec, f"unknown({codec})")


def to_pb_dtype(dtype: torch.dtype) -> int:
    """torch dtype -> swarm_pb2.DType; ProtocolError for dtypes the wire cannot carry (e.g. float64)."""
    try:
        return _DTYPE_TO_PB[dtype]
    except KeyError:
        supported = ", ".join(str(d).removeprefix("torch.") for d in _DTYPE_TO_PB)
        raise ProtocolError(
            f"dtype {dtype} cannot be sent on the wire; cast to one of: {supported}"
        ) from None


def from_pb_dtype(value: int) -> torch.dtype:
    """swarm_pb2.DType -> torch dtype; ProtocolError for unknown or unspecified values."""
    try:
        return _PB_TO_DTYPE[value]
    except KeyError:
        raise ProtocolError(
            f"unknown tensor dtype {value} (valid: {sorted(_PB_TO_DTYPE)}); "
            "the peer may run a newer protocol version"
        ) from None


def raw_nbytes(t: torch.Tensor) -> int:
    """Bytes the tensor occupies uncompressed (for bytes-on-wire metrics)."""
    return t.numel() * t.element_size()


def encoded_nbytes(msg: swarm_pb2.Tensor) -> int:
    """Serialized size of the message, header fields included (for bytes-on-wire metrics)."""
    return msg.ByteSize()


# ------------------------------------------------------------------------------------- encoding ---


def encode_tensor(
    t: torch.Tensor, codec: int | str = "none", *, block_size: int = DEFAULT_BLOCK_SIZE
) -> swarm_pb2.Tensor:
    """Encode `t` (any device, any strides) into a message; lossy codecs apply to floating tensors only.

    Integer and bool tensors are always sent with CODEC_NONE. The message records t's dtype, so
    `decode_tensor` returns that dtype whatever the codec.
    """
    codec_value = _resolve_codec(codec)
    pb_dtype = to_pb_dtype(t.dtype)
    if not t.is_floating_point():
        codec_value = swarm_pb2.CODEC_NONE
    if codec_value != swarm_pb2.CODEC_INT8_BLOCKWISE:
        block_size = 0
    elif not 0 < block_size <= _MAX_BLOCK_SIZE:
        raise ConfigError(f"int8 block_size must be in [1, {_MAX_BLOCK_SIZE}], got {block_size}")
    t = t.detach()
    header = swarm_pb2.Tensor(
        shape=list(t.shape),
        dtype=cast(swarm_pb2.DType, pb_dtype),  # plain ints at runtime; the stubs want their enum types
        codec=cast(swarm_pb2.Codec, codec_value),
        block_size=block_size,
    )
    nbytes = _expected_nbytes(codec_value, t.dtype, t.numel(), block_size)
    if codec_value == swarm_pb2.CODEC_INT8_BLOCKWISE:
        return _serialize_into(header, nbytes, lambda data: _encode_int8(t, block_size, data))
    target = _HALF_CODEC_DTYPE.get(codec_value, t.dtype)
    if 0 < nbytes <= _SMALL_BYTES and t.device.type == "cpu":
        payload = t.to(target).contiguous().reshape(-1).view(torch.uint8)
        header.data = payload.numpy().tobytes()
        return header
    # One copy_ gathers strides, casts and moves off the GPU at once.
    return _serialize_into(header, nbytes, lambda data: data.view(target).view(t.shape).copy_(t))


def _resolve_codec(codec: int | str) -> int:
    if isinstance(codec, str):
        return parse_codec(codec)
    if codec not in _CODEC_LABELS:
        raise ConfigError(f"unknown codec value {codec}; valid: {CODEC_NAMES}")
    return codec


def _encode_int8(t: torch.Tensor, block_size: int, data: torch.Tensor) -> None:
    """Write the int8 values, then the float32 absmax of each block, into `data` (uint8, CPU)."""
    n = t.numel()
    full = n // block_size * block_size
    src = t.reshape(-1)  # blocks follow the row-major element order; copies only if t is strided
    on_cpu = t.device.type == "cpu"
    q = data[:n].view(torch.int8) if on_cpu else torch.empty(n, dtype=torch.int8, device=t.device)
    absmax = torch.empty(-(-n // block_size), dtype=torch.float32, device=t.device)
    if full:
        _quantize(
            src[:full].view(-1, block_size), q[:full].view(-1, block_size), absmax[: full // block_size]
        )
    if full < n:
        _quantize(src[full:].view(1, -1), q[full:].view(1, -1), absmax[-1:])
    # amax propagates NaN and inf, so one reduction over the (64x fewer) scales checks every value.
    if absmax.numel() and not math.isfinite(absmax.amax().item()):
        raise ProtocolError(
            "the int8 codec cannot encode NaN or inf values; send this tensor with fp16/bf16/none"
        )
    if not on_cpu:
        data[:n].view(torch.int8).copy_(q)
    data[n:].copy_(absmax.cpu().view(torch.uint8))


def _quantize(x: torch.Tensor, q: torch.Tensor, absmax: torch.Tensor) -> None:
    """x [blocks, bs] (float) -> q [blocks, bs] int8 and absmax [blocks] float32, chunk by chunk."""
    rows = max(1, _CHUNK_ELEMENTS // x.shape[1])
    scratch = torch.empty(min(rows, x.shape[0]), x.shape[1], dtype=torch.float32, device=x.device)
    inv = torch.empty(scratch.shape[0], dtype=torch.float32, device=x.device)
    for lo in range(0, x.shape[0], rows):
        hi = min(lo + rows, x.shape[0])
        xc, tmp, inv_c, am = x[lo:hi], scratch[: hi - lo], inv[: hi - lo], absmax[lo:hi]
        if xc.dtype != torch.float32:
            xc = tmp.copy_(xc)  # compute in float32; the multiply below may then overwrite it in place
        # max(amax, -amin) reads x twice but allocates nothing, unlike x.abs().amax().
        torch.amax(xc, dim=1, out=am)
        torch.amin(xc, dim=1, out=inv_c)
        torch.maximum(am, inv_c.neg_(), out=am)
        # All-zero blocks: 127/0 = inf -> 0, so they encode as zeros instead of NaN.
        torch.reciprocal(am, out=inv_c).mul_(_INT8_LEVELS).nan_to_num_(nan=0.0, posinf=0.0)
        torch.mul(xc, inv_c[:, None], out=tmp).round_()
        q[lo:hi].copy_(tmp)  # |tmp| <= 127 by construction, so the int8 cast never wraps


def _serialize_into(
    header: swarm_pb2.Tensor, nbytes: int, fill: Callable[[torch.Tensor], object]
) -> swarm_pb2.Tensor:
    """Build `header` with an `nbytes` payload written by `fill`, copying the payload only once.

    Setting `Tensor.data` from Python costs two full copies (tensor -> bytes -> protobuf). Instead
    `fill` writes straight into a buffer laid out as a serialized message, field 1 (`data`) first and
    the other fields after it (protobuf accepts any order), and `FromString` copies that buffer once.
    """
    prefix = _DATA_TAG + _varint(nbytes)
    suffix = header.SerializeToString()  # `data` is still empty, so it is not in here
    pad = -len(prefix) % _ALIGN  # cache buffers are _ALIGN-aligned: align the payload as well
    begin, end = pad + len(prefix), pad + len(prefix) + nbytes
    buffer = _BUFFERS.take(end + len(suffix))
    buffer[pad:begin] = np.frombuffer(prefix, dtype=np.uint8)
    buffer[end:] = np.frombuffer(suffix, dtype=np.uint8)
    if nbytes:  # torch.from_numpy gives empty arrays stride 0, which view(dtype) rejects
        fill(torch.from_numpy(buffer[begin:end]))
    # upb parses any buffer, not just bytes; its stub is narrower than the implementation.
    return swarm_pb2.Tensor.FromString(cast(bytes, buffer[pad:].data))


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# ------------------------------------------------------------------------------------- decoding ---


def decode_tensor(msg: swarm_pb2.Tensor, *, max_elements: int | None = None) -> torch.Tensor:
    """Decode a message into a new, writable CPU tensor of the message's dtype and shape.

    Every field is checked before anything is allocated; malformed or oversized messages raise
    ProtocolError; oversized ones raise its subclass LimitExceeded ("RESOURCE limit exceeded: ..."),
    before any allocation. The result
    never aliases `msg`. Its storage is a numpy buffer (recycled once the tensor dies), so it cannot
    be resized in place (`resize_`); everything else behaves as usual.
    """
    dtype, shape, numel = _check_header(msg, max_elements)
    data = msg.data  # protobuf returns a fresh copy on every access: read it exactly once
    expected = _expected_nbytes(msg.codec, dtype, numel, msg.block_size)
    if len(data) != expected:
        raise ProtocolError(
            f"corrupt tensor: {codec_label(msg.codec)}-encoded {dtype} tensor of shape {shape} must carry "
            f"{expected} bytes of data, got {len(data)} bytes"
        )
    decoder = _DECODERS[msg.codec]
    return decoder(data, dtype, numel, msg.block_size).view(shape)


def _check_header(msg: swarm_pb2.Tensor, max_elements: int | None) -> tuple[torch.dtype, list[int], int]:
    dtype = from_pb_dtype(msg.dtype)
    if msg.codec not in _CODEC_LABELS:
        raise ProtocolError(
            f"unknown tensor codec {msg.codec} (valid: {CODEC_NAMES}); "
            "the peer may run a newer protocol version"
        )
    if msg.codec != swarm_pb2.CODEC_NONE and not dtype.is_floating_point:
        raise ProtocolError(f"codec {codec_label(msg.codec)} applies to floating tensors only, not {dtype}")
    shape = list(msg.shape)
    if len(shape) > _MAX_NDIM or any(d < 0 for d in shape):
        raise ProtocolError(
            f"invalid tensor shape {shape[: _MAX_NDIM + 1]}: need at most {_MAX_NDIM} dims, all >= 0"
        )
    numel = math.prod(shape)
    if max_elements is not None and numel > max_elements:
        raise LimitExceeded(
            f"RESOURCE limit exceeded: tensor of shape {shape} has {numel} elements, this peer accepts at "
            f"most {max_elements} per tensor; send fewer tokens or a smaller batch per request"
        )
    if msg.codec == swarm_pb2.CODEC_INT8_BLOCKWISE and msg.block_size <= 0:
        raise ProtocolError("corrupt tensor: int8 codec needs block_size > 0, got 0")
    return dtype, shape, numel


def _expected_nbytes(codec: int, dtype: torch.dtype, numel: int, block_size: int) -> int:
    if codec == swarm_pb2.CODEC_INT8_BLOCKWISE:
        return numel + 4 * -(-numel // block_size)
    if codec in _HALF_CODEC_DTYPE:
        return 2 * numel
    return numel * dtype.itemsize


def _decode_raw(data: bytes, dtype: torch.dtype, numel: int, block_size: int) -> torch.Tensor:
    if dtype == torch.bool:
        # Bytes other than 0/1 would make an invalid torch bool; normalise them instead of trusting them.
        return _readonly(data, torch.uint8, numel) != 0
    if 0 < len(data) <= _SMALL_BYTES:  # one copy into a fresh, writable buffer
        return torch.frombuffer(bytearray(data), dtype=dtype, count=numel)
    out = _empty(numel, dtype)
    out.copy_(_readonly(data, dtype, numel))
    return out


def _decode_half(codec: int) -> Callable[[bytes, torch.dtype, int, int], torch.Tensor]:
    def decode(data: bytes, dtype: torch.dtype, numel: int, block_size: int) -> torch.Tensor:
        out = _empty(numel, dtype)
        out.copy_(_readonly(data, _HALF_CODEC_DTYPE[codec], numel))
        return out

    return decode


def _decode_int8(data: bytes, dtype: torch.dtype, numel: int, block_size: int) -> torch.Tensor:
    nblocks = -(-numel // block_size)
    # The scales sit right after `numel` bytes, so they may be misaligned: copy them (they are few).
    absmax = torch.from_numpy(np.frombuffer(data, dtype="<f4", count=nblocks, offset=numel).copy())
    if nblocks:
        lowest, highest = (v.item() for v in torch.aminmax(absmax))
        if not (lowest >= 0 and math.isfinite(highest)):  # also false for NaN
            raise ProtocolError("corrupt tensor: int8 block scales must be finite and >= 0")
    scale = absmax.div_(_INT8_LEVELS)
    q = _readonly(data, torch.int8, numel)
    out = _empty(numel, torch.float32)
    full = numel // block_size * block_size
    if full:
        _dequantize(
            q[:full].view(-1, block_size), scale[: full // block_size], out[:full].view(-1, block_size)
        )
    if full < numel:
        _dequantize(q[full:].view(1, -1), scale[-1:], out[full:].view(1, -1))
    return out if dtype == torch.float32 else out.to(dtype)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    # int8 * float32 with broadcasting takes torch's slow mixed-dtype path: cast, then scale in place,
    # one cache-sized chunk at a time.
    rows = max(1, _CHUNK_ELEMENTS // q.shape[1])
    for lo in range(0, q.shape[0], rows):
        hi = lo + rows
        out[lo:hi].copy_(q[lo:hi]).mul_(scale[lo:hi, None])


_DECODERS: Final[dict[int, Callable[[bytes, torch.dtype, int, int], torch.Tensor]]] = {
    swarm_pb2.CODEC_NONE: _decode_raw,
    swarm_pb2.CODEC_FLOAT16: _decode_half(swarm_pb2.CODEC_FLOAT16),
    swarm_pb2.CODEC_BFLOAT16: _decode_half(swarm_pb2.CODEC_BFLOAT16),
    swarm_pb2.CODEC_INT8_BLOCKWISE: _decode_int8,
}


# -------------------------------------------------------------------------------------- buffers ---


def _readonly(data: bytes, dtype: torch.dtype, numel: int, offset: int = 0) -> torch.Tensor:
    """Zero-copy 1-D view of `data` (never written to); frombuffer rejects empty buffers, so special-case."""
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype, count=numel, offset=offset)


def _empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Uninitialised 1-D CPU tensor on memory from the buffer cache."""
    if numel == 0:  # torch.from_numpy gives empty arrays stride 0, which view(dtype) rejects
        return torch.empty(0, dtype=dtype)
    return torch.from_numpy(_BUFFERS.take(numel * dtype.itemsize)).view(dtype)


class _BufferCache:
    """Recycles large host buffers, as torch's CUDA allocator does for device memory.

    A fresh multi-MiB allocation is mmap-ed and the kernel zeroes every page on first touch, which
    costs more than the codecs themselves. Buffers of at least `min_bytes` are handed out as numpy
    views (numpy also asks for huge pages); when the last tensor using a view dies, its buffer comes
    back here, and up to `max_bytes` of them are kept for reuse, the oldest dropped first.
    """

    def __init__(self, min_bytes: int, max_bytes: int) -> None:
        self._min_bytes, self._max_bytes = min_bytes, max_bytes
        self._free: deque[np.ndarray] = deque()
        self._free_bytes = 0
        # Finalizers run wherever a tensor happens to die, even inside take(): they only append here
        # (atomic under the GIL) and take() files them under the lock, so nothing can deadlock.
        self._returned: deque[np.ndarray] = deque()
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        """An uninitialised uint8 array of `nbytes`, _ALIGN-aligned."""
        if nbytes < self._min_bytes:
            return np.empty(nbytes, dtype=np.uint8)
        size = -(-nbytes // _CACHE_GRANULE) * _CACHE_GRANULE
        with self._lock:
            base = self._reuse(size)
        if base is None:
            base = np.empty(size, dtype=np.uint8)
        view = base[:nbytes]
        weakref.finalize(view, self._returned.append, base).atexit = False
        return view

    def _reuse(self, size: int) -> np.ndarray | None:
        while self._returned:
            self._free.append(self._returned.popleft())
            self._free_bytes += self._free[-1].nbytes
        while self._free_bytes > self._max_bytes:
            self._free_bytes -= self._free.popleft().nbytes
        for i, base in enumerate(self._free):
            if base.nbytes == size:
                del self._free[i]
                self._free_bytes -= size
                return base
        return None


_BUFFERS: Final = _BufferCache(min_bytes=1 << 20, max_bytes=256 << 20)
