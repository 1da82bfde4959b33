"""jaxmoe: Triton Mixture-of-Experts kernels for JAX, with a jax.numpy reference beside every kernel.

Public API::

    jaxmoe.route(logits, top_k, ...)                      -> (topk_weights, topk_ids)
    jaxmoe.fused_moe(x, w1, w2, topk_weights, topk_ids)   -> y
    jaxmoe.init_moe_params(key, hidden=, intermediate=, experts=) -> params
    jaxmoe.moe_layer(params, x, top_k=)                   -> y
    jaxmoe.moe_layer(params, x, top_k=, mesh=, expert_axis=, tensor_axis=, data_axis=)  (docs/parallel.md)
    jaxmoe.parallel.shard_params / communication_bytes / choose_schedule
    jaxmoe.ops.align / grouped_gemm / moe_align_block_size / moe_gemm / max_padded_rows / router_sigmoid_top1
    jaxmoe.reference.*                                    (plain jax.numpy versions)
    jaxmoe.RoutingData, jaxmoe.QuantizedWeights, jaxmoe.Numerics, jaxmoe.ClampedSwiGLU   (the data types)
    jaxmoe.quantize_weights(w, scheme)                    -> QuantizedWeights (docs/quantization.md)
    jaxmoe.quantize.from_mxfp4 / from_gptq / from_awq / with_fp8_dtype

Every op takes ``implementation=None | "triton" | "reference"`` (or a sequence of them)
and composes with ``jax.jit``.
"""

from jaxmoe import ops, parallel, quantize, reference
from jaxmoe.layer import init_moe_params, moe_layer
from jaxmoe.ops.moe import fused_moe
from jaxmoe.ops.routing import route
from jaxmoe.quantize import quantize_weights
from jaxmoe.types import ClampedSwiGLU, Numerics, QuantizedWeights, RoutingData

__version__ = "0.1.0"

__all__ = ["route", "fused_moe", "moe_layer", "init_moe_params", "ops", "parallel", "reference", "RoutingData",
           "QuantizedWeights", "Numerics", "ClampedSwiGLU", "quantize", "quantize_weights", "__version__"]
