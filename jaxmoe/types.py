"""The data types that flow between jaxmoe's ops: routing data, numerics, quantized weights.

All three are frozen dataclasses; :class:`RoutingData` and :class:`QuantizedWeights` are
registered pytrees (arrays as leaves, sizes and the scheme as static metadata), so they
pass through ``jax.jit``, ``jax.tree_util`` and, as the transforms arrive, ``vmap`` and
``grad`` like any other argument.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["RoutingData", "Numerics", "QuantizedWeights", "WeightScheme", "WEIGHT_SCHEMES", "ACT_QUANTS",
           "ACT_QUANT_SCHEMES", "FP8_DTYPES", "FP8_MAX", "INT8_MAX", "QUANT_BLOCK", "MX_BLOCK", "ClampedSwiGLU"]


@dataclasses.dataclass(frozen=True)
class RoutingData:
    """Which (token, slot) rows go to which expert, laid out for the grouped GEMMs.

    A row is the flat index ``f = token * top_k + slot`` of ``topk_ids``. Produced by
    :func:`jaxmoe.ops.align`; consumed by :func:`jaxmoe.ops.grouped_gemm` and the fused layer.

    Arrays (pytree leaves):
      sorted_token_ids: ``[P] int32``: rows grouped by expert (ascending expert, then
        ascending ``f``), each expert's run padded with the sentinel ``num_rows`` to a
        multiple of ``block_size``; ``P = max_padded_rows(num_rows, num_experts, block_size)``.
      expert_ids: ``[P // block_size] int32``: the expert of each block, ``-1`` for the
        unused blocks at the end.
      num_tokens_post_padded: ``[1] int32``: the rows of the used blocks.
      topk_ids: ``[M, top_k] int32`` or None: the ids the layout was built from.
      topk_weights: ``[M, top_k] float32`` or None: their routing weights.

    Static (metadata): ``block_size`` (the GEMMs' BLOCK_M), ``num_experts`` (E),
    ``top_k`` (k) and ``num_rows`` (``M * k``).
    """

    sorted_token_ids: jax.Array
    expert_ids: jax.Array
    num_tokens_post_padded: jax.Array
    topk_ids: jax.Array | None
    topk_weights: jax.Array | None
    block_size: int
    num_experts: int
    top_k: int
    num_rows: int

    @property
    def num_tokens(self) -> int:
        """``M``: the tokens the rows come from."""
        return self.num_rows // self.top_k

    @property
    def num_blocks(self) -> int:
        return int(self.expert_ids.shape[0])

    def layout(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(sorted_token_ids, expert_ids, num_tokens_post_padded)``, the seed's triple."""
        return self.sorted_token_ids, self.expert_ids, self.num_tokens_post_padded


jax.tree_util.register_dataclass(
    RoutingData,
    data_fields=["sorted_token_ids", "expert_ids", "num_tokens_post_padded", "topk_ids", "topk_weights"],
    meta_fields=["block_size", "num_experts", "top_k", "num_rows"],
)


@dataclasses.dataclass(frozen=True)
class WeightScheme:
    """How expert weights ``[E, N, K]`` are stored: value dtypes, packing, scales, zero points.

    ``values`` has shape ``[E, N, K]``, or ``[E, N, K / 2]`` for a 4-bit scheme (two values
    a byte along K: element ``2j`` in the low nibble of byte ``j``, ``2j + 1`` in the high
    one). One scale covers ``group_n`` output channels (rows) times ``group_k`` input
    channels (None: the whole axis); ``scale_axes`` says which of ``(E, N, K)`` the scales
    are indexed by. Zero points, where the scheme has them, have the scales' shape. Layers
    stacked along leading axes (``[L, E, N, K]``, for ``jax.lax.scan`` or ``jax.vmap`` over
    layers) carry the same leading axes on the scales and zero points.
    """

    name: str
    value_dtypes: tuple[str, ...]
    scale_dtypes: tuple[str, ...] = ()
    scale_axes: tuple[str, ...] = ()  # subset of ("E", "N", "K"), in order; () = no scales
    group_n: int | None = 1
    group_k: int | None = None
    packed: bool = False  # two 4-bit values a byte along K
    zero_points: bool = False

    @property
    def bits(self) -> int:
        return 4 if self.packed else 8 if self.scale_axes else 16

    def logical_shape(self, values_shape: tuple[int, ...]) -> tuple[int, ...]:
        """``[..., E, N, K]`` of the weights ``values_shape`` (``[..., E, N, K or K / 2]``) stores."""
        *lead, e, n, k = values_shape
        return (*lead, e, n, 2 * k) if self.packed else (*lead, e, n, k)

    def expected_scales(self, values_shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """The shape ``scales`` must have for ``values`` of ``values_shape`` (None: no scales):
        the leading (stacked-layer) axes, then the scheme's ``scale_axes``."""
        if not self.scale_axes:
            return None
        *lead, e, n, k = self.logical_shape(values_shape)
        sizes = {"E": e, "N": -(-n // self.group_n) if self.group_n else 1,
                 "K": -(-k // self.group_k) if self.group_k else 1}
        return (*lead, *(sizes[a] for a in self.scale_axes))


_FLOATS = ("float32", "bfloat16", "float16")
FP8_DTYPES = ("float8_e4m3fn", "float8_e4m3fnuz")
FP8_MAX = {"float8_e4m3fn": 448.0, "float8_e4m3fnuz": 240.0}
INT8_MAX = 127.0
QUANT_BLOCK = 128  # fp8_block's 128 x 128 blocks; int4's groups of 128 along K
MX_BLOCK = 32  # mxfp4: one e8m0 scale per 32 values along K

WEIGHT_SCHEMES: Mapping[str, WeightScheme] = {
    # Weights stored in the activation dtype: no scales.
    "none": WeightScheme("none", _FLOATS),
    # fp8 e4m3, one scale per (expert, output channel)
    "fp8": WeightScheme("fp8", FP8_DTYPES, _FLOATS, ("E", "N")),
    # fp8 e4m3, one scale per expert
    "fp8_tensor": WeightScheme("fp8_tensor", FP8_DTYPES, _FLOATS, ("E",), group_n=None),
    # fp8 e4m3, one scale per 128 x 128 block of (N, K): DeepSeek-V3's weight_scale_inv
    "fp8_block": WeightScheme("fp8_block", FP8_DTYPES, _FLOATS, ("E", "N", "K"), group_n=QUANT_BLOCK,
                              group_k=QUANT_BLOCK),
    # symmetric int8, one scale per (expert, output channel)
    "int8": WeightScheme("int8", ("int8",), _FLOATS, ("E", "N")),
    # signed int4 (two's complement nibbles), one scale per (expert, channel, 128 along K)
    "int4": WeightScheme("int4", ("uint8",), _FLOATS, ("E", "N", "K"), group_k=QUANT_BLOCK, packed=True),
    # unsigned int4 with a zero point per group (AWQ/GPTQ asymmetric): w = (q - z) * s
    "int4_zp": WeightScheme("int4_zp", ("uint8",), _FLOATS, ("E", "N", "K"), group_k=QUANT_BLOCK, packed=True,
                            zero_points=True),
    # OCP MX fp4: e2m1 values, one e8m0 scale (uint8, 2^(s - 127)) per 32 values along K
    "mxfp4": WeightScheme("mxfp4", ("uint8",), ("uint8",), ("E", "N", "K"), group_k=MX_BLOCK, packed=True),
}

ACT_QUANTS = ("fp8", "int8")
# which weight schemes each activation quantization multiplies against
ACT_QUANT_SCHEMES = {"fp8": ("fp8", "fp8_tensor", "fp8_block"), "int8": ("int8",)}


@dataclasses.dataclass(frozen=True)
class QuantizedWeights:
    """Expert weights ``[E, N, K]`` (``w1`` or ``w2``) as stored values plus scales.

    ``values`` holds the stored elements (``[E, N, K / 2]`` bytes for 4-bit schemes),
    ``scales`` the per-scheme scale factors (None for ``scheme="none"``), ``scheme``
    (static) a key of :data:`WEIGHT_SCHEMES`, ``zero_points`` (``int4_zp`` only) one uint8
    in ``[0, 15]`` per scale. Built from given values and scales it is validated: the dtypes
    must be ones the scheme stores, the scales (and zero points) the shape it prescribes.
    :meth:`dequantize` returns the weights in fp32; ``shape`` is the logical ``[E, N, K]``.
    Several layers' weights may be stacked along leading axes (``values [L, E, N, K]``,
    scales ``[L, ...]``; ``jax.tree.map(jnp.stack, *layers)`` builds one), for
    ``jax.lax.scan`` or ``jax.vmap`` over layers, whose bodies see one layer's
    ``[E, N, K]``; ``fused_moe`` and ``moe_layer`` take one layer's.
    See ``docs/quantization.md`` for each scheme's layout and math.
    """

    values: jax.Array
    scales: jax.Array | None = None
    scheme: str = "none"
    zero_points: jax.Array | None = None

    def __post_init__(self) -> None:
        if self.scheme not in WEIGHT_SCHEMES:
            raise ValueError(f"unknown weight scheme {self.scheme!r}; known: {sorted(WEIGHT_SCHEMES)}")
        if not _is_shaped(self.values):
            return  # a pytree placeholder while jax rebuilds the tree (tree_map, transforms)
        spec = WEIGHT_SCHEMES[self.scheme]
        shape = tuple(self.values.shape)
        if len(shape) < 3:
            raise ValueError(f"QuantizedWeights.values must be [E, N, K] (3-D; [L, E, N, K] for stacked layers), "
                             f"got shape {list(shape)}")
        if np.dtype(self.values.dtype).name not in spec.value_dtypes:
            raise TypeError(f"scheme {self.scheme!r} stores values as {', '.join(spec.value_dtypes)}; "
                            f"values have dtype {self.values.dtype}")
        want = spec.expected_scales(shape)
        if want is None and self.scales is not None:
            raise ValueError(f"scheme {self.scheme!r} has no scales; got scales of shape {list(self.scales.shape)}")
        for name, arr, needed, dtypes in (("scales", self.scales, want, spec.scale_dtypes),
                                          ("zero_points", self.zero_points, want if spec.zero_points else None,
                                           ("uint8",))):
            if needed is None:
                if arr is not None:
                    raise ValueError(f"scheme {self.scheme!r} has no {name}; got {name} of shape "
                                     f"{list(getattr(arr, 'shape', ()))}")
                continue
            if arr is None:
                raise ValueError(f"scheme {self.scheme!r} needs {name} of shape {list(needed)}")
            if _is_shaped(arr):
                if tuple(arr.shape) != needed:
                    raise ValueError(f"scheme {self.scheme!r} needs {name} of shape {list(needed)} for values "
                                     f"{list(shape)}, got {list(arr.shape)}")
                if np.dtype(arr.dtype).name not in dtypes:
                    raise TypeError(f"scheme {self.scheme!r} stores {name} as {', '.join(dtypes)}; "
                                    f"got {arr.dtype}")

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical ``[E, N, K]`` (K is twice the stored width for 4-bit schemes), after
        any stacked-layer axes."""
        return WEIGHT_SCHEMES[self.scheme].logical_shape(tuple(self.values.shape))

    @property
    def dtype(self) -> Any:
        """The stored values' dtype."""
        return self.values.dtype

    def dequantize(self) -> jax.Array:
        """The weights as fp32 ``[..., E, N, K]``."""
        from jaxmoe import quantize

        return quantize.dequantize(self)


def _is_shaped(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


jax.tree_util.register_dataclass(QuantizedWeights, data_fields=["values", "scales", "zero_points"],
                                 meta_fields=["scheme"])


@dataclasses.dataclass(frozen=True)
class Numerics:
    """Where a MoE layer rounds: the dtypes the kernels and the reference agree on.

    ``compute_dtype``: the activation dtype (also that of ``h`` between the stages and of
    each weighted (token, slot) row); products accumulate in ``accum_dtype`` (fp32).
    ``weights``: the weight scheme of ``w1``/``w2`` (``"none"``: stored in
    ``compute_dtype``); ``act_quant``: the activation quantization (None: none).
    """

    compute_dtype: Any = jnp.bfloat16
    accum_dtype: Any = jnp.float32
    weights: str = "none"
    act_quant: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "compute_dtype", jnp.dtype(self.compute_dtype))
        object.__setattr__(self, "accum_dtype", jnp.dtype(self.accum_dtype))
        if self.weights not in WEIGHT_SCHEMES:
            raise ValueError(f"unknown weight scheme {self.weights!r}; known: {sorted(WEIGHT_SCHEMES)}")
        if self.act_quant is not None and self.act_quant not in ACT_QUANTS:
            raise ValueError(f"act_quant must be None or one of {ACT_QUANTS}, got {self.act_quant!r}")


@dataclasses.dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's gated activation, fused in stage 1's epilogue (static, hashable)::

        gate = min(gate, limit)            (no lower clamp)
        up   = clip(up, -limit, limit)
        h    = (up + 1) * gate * sigmoid(alpha * gate)

    ``activation="clamped_swiglu"`` means ``ClampedSwiGLU()`` (gpt-oss's ``alpha=1.702``,
    ``limit=7.0``; a checkpoint's ``swiglu_limit`` overrides the limit). A NaN in gate or up
    stays NaN (the clamps compare, they do not drop NaN).
    """

    alpha: float = 1.702
    limit: float = 7.0

    def __post_init__(self) -> None:
        for name in ("alpha", "limit"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
                raise TypeError(f"ClampedSwiGLU.{name} must be a Python float, got {type(v).__name__}")
            if not np.isfinite(v):
                raise ValueError(f"ClampedSwiGLU.{name} must be finite, got {v}")
            object.__setattr__(self, name, float(v))
        if self.limit <= 0:
            raise ValueError(f"ClampedSwiGLU.limit must be > 0, got {self.limit}")
