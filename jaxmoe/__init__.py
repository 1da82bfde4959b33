"""jaxmoe: Triton Mixture-of-Experts kernels for JAX, with a jax.numpy reference beside every kernel.

Public API::

    jaxmoe.route(logits, top_k, ...)                      -> (topk_weights, topk_ids)
    jaxmoe.fused_moe(x, w1, w2, topk_weights, topk_ids)   -> y
    jaxmoe.init_moe_params(key, hidden=, intermediate=, experts=) -> params
    jaxmoe.moe_layer(params, x, top_k=)                   -> y
    jaxmoe.ops.moe_align_block_size / moe_gemm / max_padded_rows
    jaxmoe.reference.*                                    (plain jax.numpy versions)

Every function takes ``implementation=None | "triton" | "reference"`` (not the reference
module's) and composes with ``jax.jit``.
"""

from jaxmoe import ops, reference
from jaxmoe.fused_moe import fused_moe
from jaxmoe.layer import init_moe_params, moe_layer
from jaxmoe.routing import route

__version__ = "0.1.0"

__all__ = ["route", "fused_moe", "moe_layer", "init_moe_params", "ops", "reference", "__version__"]
