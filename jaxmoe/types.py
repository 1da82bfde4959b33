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

__all__ = ["RoutingData", "Numerics", "QuantizedWeights", "WeightScheme", "WEIGHT_SCHEMES", "ClampedSwiGLU"]


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
    """How expert weights are stored: the value dtypes allowed and the shape of the scales.

    ``scale_shape(values_shape)`` gives the shape of ``scales`` for a ``[E, N, K]`` weight,
    or None for a scheme without scales. Quantization issues add schemes here and the
    kernels' weight-scheme constexpr; nothing else in the layer needs to know.
    """

    name: str
    value_dtypes: tuple[str, ...]
    scale_shape: Any = None  # Callable[[tuple[int, int, int]], tuple[int, ...]] | None

    def expected_scales(self, values_shape: tuple[int, ...]) -> tuple[int, ...] | None:
        return None if self.scale_shape is None else tuple(self.scale_shape(values_shape))


WEIGHT_SCHEMES: Mapping[str, WeightScheme] = {
    # Weights stored in the activation dtype: no scales.
    "none": WeightScheme("none", ("bfloat16", "float16", "float32")),
}


@dataclasses.dataclass(frozen=True)
class QuantizedWeights:
    """Expert weights ``[E, N, K]`` (``w1`` or ``w2``) as stored values plus scales.

    ``values`` holds the stored elements, ``scales`` the per-scheme scale factors (None for
    ``scheme="none"``), ``scheme`` (static) a key of :data:`WEIGHT_SCHEMES`. Built from
    given values and scales it is validated: the dtype must be one the scheme stores, the
    scales the shape the scheme prescribes. :meth:`dequantize` returns the weights in fp32.
    """

    values: jax.Array
    scales: jax.Array | None = None
    scheme: str = "none"

    def __post_init__(self) -> None:
        if self.scheme not in WEIGHT_SCHEMES:
            raise ValueError(f"unknown weight scheme {self.scheme!r}; known: {sorted(WEIGHT_SCHEMES)}")
        if not _is_shaped(self.values):
            return  # a pytree placeholder while jax rebuilds the tree (tree_map, transforms)
        spec = WEIGHT_SCHEMES[self.scheme]
        shape = tuple(self.values.shape)
        if len(shape) != 3:
            raise ValueError(f"QuantizedWeights.values must be [E, N, K] (3-D), got shape {list(shape)}")
        if np.dtype(self.values.dtype).name not in spec.value_dtypes:
            raise TypeError(f"scheme {self.scheme!r} stores {', '.join(spec.value_dtypes)}; "
                            f"values have dtype {self.values.dtype}")
        want = spec.expected_scales(shape)
        if want is None and self.scales is not None:
            raise ValueError(f"scheme {self.scheme!r} has no scales; got scales of shape {list(self.scales.shape)}")
        if want is not None:
            if self.scales is None:
                raise ValueError(f"scheme {self.scheme!r} needs scales of shape {list(want)}")
            if _is_shaped(self.scales) and tuple(self.scales.shape) != want:
                raise ValueError(f"scheme {self.scheme!r} needs scales of shape {list(want)} for values "
                                 f"{list(shape)}, got {list(self.scales.shape)}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def dequantize(self) -> jax.Array:
        """The weights as fp32 ``[E, N, K]``."""
        values = jnp.asarray(self.values).astype(jnp.float32)
        return values if self.scales is None else values * jnp.asarray(self.scales, jnp.float32)


def _is_shaped(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


jax.tree_util.register_dataclass(QuantizedWeights, data_fields=["values", "scales"], meta_fields=["scheme"])


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
        if self.act_quant is not None:
            raise ValueError(f"act_quant={self.act_quant!r}: no activation quantization is available yet")


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
