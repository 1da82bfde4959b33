"""jaxmoe's ops, one folder per family: ``routing``, ``alignment``, ``gemm`` (grouped GEMM), ``moe`` (fused MoE).

Each family holds its reference (``reference.py``), its Triton launch plans
(``triton.py``), its ``@triton.jit`` kernels (``kernels.py``) and, for the GEMMs, its
configs (``config.py``); its ``__init__`` defines the :class:`~jaxmoe.ops.base.Op` and the
public function. The building blocks re-exported here:

* :func:`moe_align_block_size` / :func:`align`: rows grouped by expert, padded to the block;
* :func:`moe_gemm` / :func:`grouped_gemm`: one grouped GEMM over those rows;
* :func:`router_sigmoid_top1`: the sigmoid top-1 router fused with its matmul;
* :func:`max_padded_rows`: the static length of the alignment.

:func:`jaxmoe.fused_moe` is stage 1 (the GEMM with the fused activation), stage 2 (the
GEMM with the routing weight), then a sum over the k slots.
"""

from __future__ import annotations

from jaxmoe.ops.alignment import ALIGN, align, max_padded_rows, moe_align_block_size
from jaxmoe.ops.base import Implementation, Op
from jaxmoe.ops.moe import FUSED_MOE, ROUTED_MOE
from jaxmoe.ops.gemm import GROUPED_GEMM, grouped_gemm, moe_gemm
from jaxmoe.ops.routing import ROUTE, SIGMOID_TOP1, router_sigmoid_top1

__all__ = ["max_padded_rows", "moe_align_block_size", "align", "moe_gemm", "grouped_gemm", "router_sigmoid_top1",
           "OPS", "Op", "Implementation"]

#: Every op by name (for introspection: ``OPS["fused_moe"].implementations``).
OPS = {op.name: op for op in (ROUTE, SIGMOID_TOP1, ALIGN, GROUPED_GEMM, FUSED_MOE, ROUTED_MOE)}

