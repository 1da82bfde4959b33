"""Quantized expert weights: quantize, dequantize, checkpoint layouts, activation rounding.

Schemes (:data:`jaxmoe.types.WEIGHT_SCHEMES`) for a weight ``w [E, N, K]`` (``w1`` or ``w2``,
PyTorch ``[out, in]`` per expert); ``w ≈ dequantize(quantize_weights(w, scheme))``:

==============  ======================================  ===================================  ======================
scheme          values                                  scales                               dequantized
==============  ======================================  ===================================  ======================
``fp8``         ``[E, N, K]`` e4m3                      ``[E, N]`` float                     ``q * s[e, n]``
``fp8_tensor``  ``[E, N, K]`` e4m3                      ``[E]`` float                        ``q * s[e]``
``fp8_block``   ``[E, N, K]`` e4m3                      ``[E, ⌈N/128⌉, ⌈K/128⌉]`` float      ``q * s[e, n//128, k//128]``
``int8``        ``[E, N, K]`` int8                      ``[E, N]`` float                     ``q * s[e, n]``
``int4``        ``[E, N, K/2]`` uint8, signed nibbles   ``[E, N, ⌈K/128⌉]`` float            ``q * s[e, n, k//128]``
``int4_zp``     ``[E, N, K/2]`` uint8, unsigned         same, + ``zero_points`` uint8        ``(q - z) * s``
``mxfp4``       ``[E, N, K/2]`` uint8, e2m1 nibbles     ``[E, N, ⌈K/32⌉]`` uint8 e8m0        ``fp4(q) * 2^(s - 127)``
==============  ======================================  ===================================  ======================

Packing of the 4-bit schemes: along K, element ``2j`` in the low nibble of byte ``j`` and
``2j + 1`` in the high nibble (gpt-oss's mxfp4 order); K must be even. ``int4`` nibbles are
two's complement (``[-8, 7]``), ``int4_zp`` nibbles unsigned (``[0, 15]``). ``e4m3`` is
``float8_e4m3fn`` (OCP) or ``float8_e4m3fnuz`` (MI300); :func:`quantize_weights` picks the
platform's (:func:`jaxmoe.backends.platform.fp8_dtype`) and :func:`with_fp8_dtype` converts.

Activations (``act_quant``) are rounded per token by :func:`quantize_activations`, exactly
as the kernels do it (see there).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.ops.gemm.reference import round_to
from jaxmoe.types import (ACT_QUANTS, FP8_DTYPES, FP8_MAX, INT8_MAX, MX_BLOCK, QUANT_BLOCK, WEIGHT_SCHEMES,
                          QuantizedWeights)

__all__ = ["quantize_weights", "dequantize", "quantize_activations", "with_fp8_dtype", "from_mxfp4",
           "from_gptq", "from_awq", "pack_int4", "unpack_int4", "E2M1_VALUES"]

# The 16 e2m1 values by nibble (sign in bit 3).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _groups(x: jax.Array, axis: int, size: int) -> jax.Array:
    """``x`` with ``axis`` zero-padded to a multiple of ``size`` and split into (groups, size)."""
    n = x.shape[axis]
    pad = -n % size
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        x = jnp.pad(x, widths)
    shape = list(x.shape)
    shape[axis:axis + 1] = [shape[axis] // size, size]
    return x.reshape(shape)


def _expand(s: jax.Array, axis: int, size: int, n: int) -> jax.Array:
    """Each entry of ``s`` along ``axis`` repeated ``size`` times, cut to ``n``."""
    return jnp.repeat(s, size, axis=axis, total_repeat_length=s.shape[axis] * size).take(jnp.arange(n), axis=axis)


def pack_int4(nibbles: jax.Array) -> jax.Array:
    """``[..., K]`` values in ``[0, 15]`` (any int dtype) -> ``[..., K/2]`` uint8, element 2j low."""
    if nibbles.shape[-1] % 2:
        raise ValueError(f"4-bit weights need an even K, got K = {nibbles.shape[-1]}")
    q = nibbles.astype(jnp.uint8) & 0xF
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """``[..., K/2]`` uint8 -> ``[..., K]`` uint8 nibbles (low nibble first)."""
    p = packed.astype(jnp.uint8)
    return jnp.stack([p & 0xF, p >> 4], axis=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])


def _e8m0(s: jax.Array) -> jax.Array:
    """``2^(s - 127)`` in fp32 for uint8 ``s``, built from bits (exact; 0 -> 2^-127, 255 -> NaN)."""
    s = s.astype(jnp.uint32)
    normal = jax.lax.bitcast_convert_type(s << 23, jnp.float32)
    out = jnp.where(s == 0, jax.lax.bitcast_convert_type(jnp.uint32(0x00400000), jnp.float32), normal)
    return jnp.where(s == 255, jnp.nan, out)


def dequantize(w: QuantizedWeights) -> jax.Array:
    """``w`` as fp32 ``[..., E, N, K]`` (the formulas of the module docstring; stacked layers
    each dequantized alike)."""
    if jnp.ndim(w.values) > 3:
        return jax.vmap(dequantize)(w)
    spec = WEIGHT_SCHEMES[w.scheme]
    e, n, k = w.shape
    if w.scheme == "none":
        return jnp.asarray(w.values).astype(jnp.float32)
    s = jnp.asarray(w.scales)
    if spec.packed:
        nib = unpack_int4(jnp.asarray(w.values))
        if w.scheme == "mxfp4":
            q = jnp.asarray(E2M1_VALUES, jnp.float32)[nib.astype(jnp.int32)]
            return q * _expand(_e8m0(s), 2, MX_BLOCK, k)
        q = nib.astype(jnp.int32)
        if w.scheme == "int4":
            q = q - ((q >> 3) << 4)  # two's complement nibble
        else:
            q = q - _expand(jnp.asarray(w.zero_points).astype(jnp.int32), 2, QUANT_BLOCK, k)
        return q.astype(jnp.float32) * _expand(s.astype(jnp.float32), 2, QUANT_BLOCK, k)
    q = jnp.asarray(w.values).astype(jnp.float32)
    s = s.astype(jnp.float32)
    if w.scheme == "fp8_tensor":
        return q * s[:, None, None]
    if w.scheme == "fp8_block":
        return q * _expand(_expand(s, 1, QUANT_BLOCK, n), 2, QUANT_BLOCK, k)
    return q * s[:, :, None]  # fp8, int8: per output channel


def _safe_scale(amax: jax.Array, qmax: float) -> jax.Array:
    return jnp.where(amax > 0, amax / qmax, 1.0)  # an all-zero group keeps scale 1 (no 0/0)


def quantize_weights(w: Any, scheme: str, *, fp8_dtype: Any = None) -> QuantizedWeights:
    """Quantize expert weights ``w [E, N, K]`` (float) to ``scheme``.

    Args:
      w: ``[E, N, K]`` floating weights (``w1 [E, 2I, D]`` or ``w2 [E, D, I]``), or several
        layers' stacked along leading axes (``[L, E, N, K]``: each layer quantized alike,
        the result stacked the same way).
      scheme: a key of :data:`jaxmoe.types.WEIGHT_SCHEMES` other than ``"none"``.
      fp8_dtype: for the fp8 schemes, ``float8_e4m3fn`` or ``float8_e4m3fnuz``; default the
        one the default platform multiplies (:func:`jaxmoe.backends.platform.fp8_dtype`).

    Returns a :class:`~jaxmoe.QuantizedWeights`; scales are fp32 (uint8 e8m0 for mxfp4).
    Round-trip error per element (``s`` the element's scale): fp8: the e4m3 rounding,
    ``|w - w'| <= 2^-4 |w|`` (plus ``s * 2^-10`` in the subnormal range); int8:
    ``<= s / 2`` with ``s = max|row| / 127``; int4: ``<= s / 2`` with ``s = max|group| / 7``;
    int4_zp: ``<= s / 2`` with ``s = (max(group, 0) - min(group, 0)) / 15``; mxfp4:
    ``<= 2^e`` (half the widest e2m1 step) with ``2^e`` the group's scale, the smallest power
    of two with ``max|group| <= 6 * 2^e``. Values already on a scheme's grid (with the
    group maxima the grid's ends) come back exactly. All-zero rows and groups get scale 1
    (zero points 0 for int4_zp, e8m0 scale 2^-127 for mxfp4) and dequantize to 0.
    """
    from jaxmoe.backends import platform

    if scheme not in WEIGHT_SCHEMES or scheme == "none":
        raise ValueError(f"scheme must be one of {sorted(set(WEIGHT_SCHEMES) - {'none'})}, got {scheme!r}")
    shape, dtype = getattr(w, "shape", None), getattr(w, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"w must be an array, got {type(w).__name__}")
    if len(shape) < 3:
        raise ValueError(f"w must be [E, N, K] (3-D; [L, E, N, K] for stacked layers), got shape {list(shape)}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"w must have a floating dtype, got {dtype}")
    spec = WEIGHT_SCHEMES[scheme]
    if spec.packed and shape[-1] % 2:
        raise ValueError(f"scheme {scheme!r} packs two values a byte along K: w's K must be even, got {shape[-1]}")
    fp8 = None
    if scheme.startswith("fp8"):
        fp8 = platform.fp8_dtype() if fp8_dtype is None else jnp.dtype(fp8_dtype)
        if fp8.name not in FP8_DTYPES:
            raise TypeError(f"fp8_dtype must be one of {FP8_DTYPES}, got {fp8}")
    fp8_name = None if fp8 is None else fp8.name
    if len(shape) > 3:  # stacked layers: one at a time (each bounded in memory as below), stacked back
        flat = jnp.asarray(w).reshape(-1, *shape[-3:])
        parts = [_quantize_experts(flat[i], scheme, fp8_name) for i in range(flat.shape[0])]
        values, scales, zero_points = (None if parts[0][j] is None else
                                       jnp.stack([p[j] for p in parts]).reshape(*shape[:-3], *parts[0][j].shape)
                                       for j in range(3))
    else:
        values, scales, zero_points = _quantize_experts(jnp.asarray(w), scheme, fp8_name)
    return QuantizedWeights(values=values, scales=scales, scheme=scheme, zero_points=zero_points)


# Experts are quantized a batch at a time, each batch holding at most this many weights, so
# each fp32 temporary is at most 256 MB, even for DeepSeek-V3's 7.5e9-value w1.
_QUANTIZE_BATCH_VALUES = 2**26


@functools.partial(jax.jit, static_argnames=("scheme", "fp8_name"))
def _quantize_experts(w: jax.Array, scheme: str, fp8_name: str | None) -> tuple[jax.Array, jax.Array, Any]:
    """``(values, scales, zero_points or None)`` of ``w [E, N, K]``, expert by expert (no scheme's
    scale spans two experts)."""
    e, n, k = w.shape
    batch = max(1, min(e, _QUANTIZE_BATCH_VALUES // max(1, n * k)))
    return jax.lax.map(lambda we: _quantize_one(we, scheme, fp8_name), w, batch_size=batch)


def _quantize_one(w: jax.Array, scheme: str, fp8_name: str | None) -> tuple[jax.Array, jax.Array, Any]:
    """One expert ``w [N, K]``: ``(values, scales, zero_points or None)`` without the E axis."""
    w = w.astype(jnp.float32)[None]
    e, n, k = w.shape
    spec = WEIGHT_SCHEMES[scheme]
    if scheme.startswith("fp8"):
        fp8 = jnp.dtype(fp8_name)
        qmax = FP8_MAX[fp8.name]
        if scheme == "fp8":
            s = _safe_scale(jnp.max(jnp.abs(w), axis=2), qmax)
            full = s[:, :, None]
        elif scheme == "fp8_tensor":
            s = _safe_scale(jnp.max(jnp.abs(w), axis=(1, 2)), qmax)
            full = s[:, None, None]
        else:
            blocks = _groups(_groups(jnp.abs(w), 1, QUANT_BLOCK), 3, QUANT_BLOCK)  # [E, Nb, 128, Kb, 128]
            s = _safe_scale(jnp.max(blocks, axis=(2, 4)), qmax)
            full = _expand(_expand(s, 1, QUANT_BLOCK, n), 2, QUANT_BLOCK, k)
        q = jnp.clip(w / full, -qmax, qmax).astype(fp8)
        return q[0], s[0], None
    if scheme == "int8":
        s = _safe_scale(jnp.max(jnp.abs(w), axis=2), INT8_MAX)
        q = jnp.clip(jnp.round(w / s[:, :, None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
        return q[0], s[0], None
    g = _groups(w, 2, spec.group_k)  # [E, N, G, group]
    if scheme == "int4":
        s = _safe_scale(jnp.max(jnp.abs(g), axis=3), 7.0)
        q = jnp.clip(jnp.round(g / s[..., None]), -8, 7).astype(jnp.int32) & 0xF
        return pack_int4(q.reshape(e, n, -1)[:, :, :k])[0], s[0], None
    if scheme == "int4_zp":
        lo, hi = jnp.minimum(jnp.min(g, axis=3), 0.0), jnp.maximum(jnp.max(g, axis=3), 0.0)
        s = _safe_scale(hi - lo, 15.0)
        z = jnp.clip(jnp.round(-lo / s), 0, 15)
        q = jnp.clip(jnp.round(g / s[..., None]) + z[..., None], 0, 15).astype(jnp.int32)
        return pack_int4(q.reshape(e, n, -1)[:, :, :k])[0], s[0], z.astype(jnp.uint8)[0]
    # mxfp4: the smallest 2^x with amax <= 6 * 2^x, from the exponent of amax / 6 (exact)
    amax = jnp.max(jnp.abs(g), axis=3)
    mant, ex = jnp.frexp(amax / 6.0)  # amax / 6 = mant * 2^ex, mant in [0.5, 1)
    x = jnp.where(mant == 0.5, ex - 1, ex)
    x = jnp.where(amax > 0, jnp.clip(x, -127, 127), -127)
    scale = _e8m0((x + 127).astype(jnp.uint8))
    v = jnp.abs(g) / scale[..., None]
    grid = jnp.asarray(E2M1_VALUES[:8], jnp.float32)
    mids = (grid[1:] + grid[:-1]) / 2
    # nearest grid value; a tie between two goes to the even (lower-mantissa) code
    idx = jnp.searchsorted(mids, v, side="left").astype(jnp.int32)
    tie = jnp.isin(v, mids) & (idx % 2 == 1)
    idx = jnp.clip(jnp.where(tie, idx - 1, idx), 0, 7)
    nib = idx | jnp.where(g < 0, 8, 0)
    return pack_int4(nib.reshape(e, n, -1)[:, :, :k])[0], (x + 127).astype(jnp.uint8)[0], None


def quantize_activations(x: jax.Array, act_quant: str, *, fp8_dtype: Any = None, group: int | None = None
                         ) -> jax.Array:
    """``x [M, K]`` rounded as the kernels round activations, returned dequantized in fp32.

    Per token (``group=None``) or per token and ``group`` channels (the last group may be
    partial), from ``x`` as stored (bf16/fp16/fp32) in fp32::

        amax  = max |x_row|          scale = amax / QMAX (+ NaN if the row holds a NaN or Inf)
        inv   = QMAX / amax (0 where amax = 0)
        q     = fp8:  clamp(x * inv, ±QMAX) rounded to e4m3 (nearest even)
                int8: clamp(floor(x * inv + 0.5), ±127)
        x'    = q * scale

    ``QMAX`` is 448 (e4m3fn), 240 (e4m3fnuz) or 127 (int8). A row with a NaN or Inf comes
    back all NaN (its scale is NaN), so a bad token stays bad and stays in its row.
    """
    if act_quant not in ACT_QUANTS:
        raise ValueError(f"act_quant must be one of {ACT_QUANTS}, got {act_quant!r}")
    m, k = x.shape
    xf = x.astype(jnp.float32)
    g = _groups(xf, 1, group) if group else xf[:, None, :]
    if act_quant == "fp8":
        fp8 = jnp.dtype(fp8_dtype or jnp.float8_e4m3fn)
        qmax = FP8_MAX[fp8.name]
    else:
        qmax = INT8_MAX
    amax = jnp.max(jnp.where(jnp.isfinite(g), jnp.abs(g), 0.0), axis=2)
    bad = jnp.sum(g * 0.0, axis=2)  # NaN where the group holds a NaN or Inf, else 0
    scale = amax / qmax + bad
    inv = jnp.where(amax > 0, qmax / jnp.where(amax > 0, amax, 1.0), 0.0)
    y = g * inv[..., None]
    if act_quant == "fp8":
        q = round_to(jnp.clip(y, -qmax, qmax), fp8).astype(jnp.float32)  # a rounding XLA keeps on GPUs
    else:
        q = jnp.clip(jnp.floor(y + 0.5), -qmax, qmax)
    out = (q * scale[..., None]).reshape(m, -1)
    return out[:, :k]


def with_fp8_dtype(w: QuantizedWeights, fp8_dtype: Any) -> QuantizedWeights:
    """``w`` (an fp8 scheme) with its values in ``fp8_dtype``, the same weights.

    ``e4m3fn -> e4m3fnuz`` reinterprets the bits (an fnuz pattern means half the fn value)
    and doubles the scales: exact; fn's ``-0`` becomes 0 and its NaN fnuz's NaN.
    ``e4m3fnuz -> e4m3fn`` converts the values and keeps the scales: exact but for values
    below 2^-6 (e4m3fn's subnormals, steps of 2^-9), rounded to nearest even.
    """
    target = jnp.dtype(fp8_dtype)
    if not w.scheme.startswith("fp8"):
        raise ValueError(f"with_fp8_dtype takes an fp8 scheme, got {w.scheme!r}")
    if target.name not in FP8_DTYPES:
        raise TypeError(f"fp8_dtype must be one of {FP8_DTYPES}, got {target}")
    if jnp.dtype(w.values.dtype) == target:
        return w
    if target == jnp.float8_e4m3fnuz:
        bits = jax.lax.bitcast_convert_type(w.values, jnp.uint8)
        bits = jnp.where(bits == 0x80, 0, jnp.where((bits & 0x7F) == 0x7F, 0x80, bits)).astype(jnp.uint8)
        values = jax.lax.bitcast_convert_type(bits, jnp.float8_e4m3fnuz)
        return QuantizedWeights(values=values, scales=jnp.asarray(w.scales) * 2, scheme=w.scheme)
    values = jnp.asarray(w.values).astype(jnp.float32).astype(jnp.float8_e4m3fn)
    return QuantizedWeights(values=values, scales=w.scales, scheme=w.scheme)


# --------------------------------------------------------------------------- checkpoint layouts


def from_mxfp4(blocks: Any, scales: Any) -> QuantizedWeights:
    """gpt-oss's mxfp4 tensors as :class:`~jaxmoe.QuantizedWeights` (scheme ``"mxfp4"``), no copy
    of the data beyond a reshape.

    Args:
      blocks: ``*_blocks``, ``[E, N, K/32, 16]`` uint8: 32 e2m1 values per row of 16 bytes,
        element ``2j`` of a block in the low nibble of byte ``j``.
      scales: ``*_scales``, ``[E, N, K/32]`` uint8 e8m0 exponents (``2^(s - 127)``).

    gpt-oss stores ``gate_up_proj`` with gate and up rows interleaved (row ``2i`` gate,
    ``2i + 1`` up); ``w1`` wants the gate rows first: reorder the rows (axis 1) of both
    tensors before this call (or use the model loader).
    """
    blocks, scales = jnp.asarray(blocks), jnp.asarray(scales)
    if blocks.ndim != 4 or blocks.shape[-1] != MX_BLOCK // 2:
        raise ValueError(f"blocks must be [E, N, K/32, 16] uint8, got shape {list(blocks.shape)}")
    if blocks.dtype != jnp.uint8:
        raise TypeError(f"blocks must be uint8, got {blocks.dtype}")
    e, n, g, _ = blocks.shape
    if tuple(scales.shape) != (e, n, g):
        raise ValueError(f"scales must be [E, N, K/32] = {[e, n, g]} to match blocks, got {list(scales.shape)}")
    return QuantizedWeights(values=blocks.reshape(e, n, g * (MX_BLOCK // 2)), scales=scales, scheme="mxfp4")


def _unpack_int32(x: jax.Array, axis: int, order: tuple[int, ...] = tuple(range(8))) -> jax.Array:
    """int32 words holding 8 nibbles -> the nibbles along ``axis`` (8x longer); nibble slot
    ``j`` (bits 4j..4j+3) holds element ``8c + order[j]``."""
    u = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.int32), jnp.uint32)
    slots = [(u >> (4 * j)) & 0xF for j in range(8)]
    inverse = [order.index(i) for i in range(8)]
    nib = jnp.stack([slots[inverse[i]] for i in range(8)], axis=axis + 1)
    shape = list(u.shape)
    shape[axis] *= 8
    return nib.reshape(shape).astype(jnp.uint8)


def _check_group(group_size: int) -> None:
    if group_size != QUANT_BLOCK:
        raise ValueError(f"group_size must be {QUANT_BLOCK} (jaxmoe's int4 groups along K), got {group_size}")


def from_gptq(qweight: Any, scales: Any, qzeros: Any, *, group_size: int = QUANT_BLOCK, zero_offset: int = 1
              ) -> QuantizedWeights:
    """Stacked GPTQ (AutoGPTQ ``QuantLinear``) tensors of ``E`` experts as ``int4_zp``.

    Args:
      qweight: ``[E, K/8, N]`` int32, 8 nibbles per word along K (element ``8i + j`` of K at
        bits ``4j``).
      scales: ``[E, K/128, N]`` float.
      qzeros: ``[E, K/128, N/8]`` int32, 8 nibbles per word along N.
      group_size: must be 128. Act-order checkpoints (a permuting ``g_idx``) are not taken.
      zero_offset: added to the stored zeros: 1 for the original GPTQ format (it stores
        ``zero - 1``), 0 for ``gptq_v2``.

    ``w[n, k] = (q[k, n] - z[k // 128, n]) * s[k // 128, n]``, as GPTQ defines it.
    """
    _check_group(group_size)
    nib = _unpack_int32(qweight, 1)  # [E, K, N]
    z = _unpack_int32(qzeros, 2).astype(jnp.int32) + zero_offset  # [E, G, N]
    if int(zero_offset) and not isinstance(z, jax.core.Tracer) and bool(jnp.any(z > 15)):
        raise ValueError("qzeros + zero_offset exceed 15: is this a gptq_v2 checkpoint (zero_offset=0)?")
    return QuantizedWeights(values=pack_int4(jnp.swapaxes(nib, 1, 2)),
                            scales=jnp.swapaxes(jnp.asarray(scales), 1, 2).astype(jnp.float32),
                            scheme="int4_zp", zero_points=jnp.swapaxes(z, 1, 2).astype(jnp.uint8))


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's GEMM packing: slot j holds column 8c + AWQ_ORDER[j]


def from_awq(qweight: Any, scales: Any, qzeros: Any, *, group_size: int = QUANT_BLOCK) -> QuantizedWeights:
    """Stacked AWQ (AutoAWQ GEMM) tensors of ``E`` experts as ``int4_zp``.

    Args:
      qweight: ``[E, K, N/8]`` int32, 8 nibbles per word along N in AutoAWQ's interleaved
        order (slot ``j`` holds column ``8c + (0, 2, 4, 6, 1, 3, 5, 7)[j]``).
      scales: ``[E, K/128, N]`` float.
      qzeros: ``[E, K/128, N/8]`` int32, packed as ``qweight``.
      group_size: must be 128.

    ``w[n, k] = (q[k, n] - z[k // 128, n]) * s[k // 128, n]``.
    """
    _check_group(group_size)
    nib = _unpack_int32(qweight, 2, AWQ_ORDER)  # [E, K, N]
    z = _unpack_int32(qzeros, 2, AWQ_ORDER)  # [E, G, N]
    return QuantizedWeights(values=pack_int4(jnp.swapaxes(nib, 1, 2)),
                            scales=jnp.swapaxes(jnp.asarray(scales), 1, 2).astype(jnp.float32),
                            scheme="int4_zp", zero_points=jnp.swapaxes(z, 1, 2))
