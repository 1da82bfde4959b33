"""A PyTorch peer for ``python -m jaxmoe bench``: the MoE layer on torch's grouped GEMMs.

The layer a PyTorch user writes with the grouped GEMMs torch ships (CUTLASS kernels on
sm_90), timed in the same run as jaxmoe's layer, on the same weights, inputs and routing:

* ``torch`` (bf16/fp16 weights): ``torch._grouped_mm``;
* ``torch:fp8+afp8`` (``--quant fp8|fp8_tensor --act-quant fp8``): ``torch._scaled_grouped_mm``
  with row-wise scales (one fp32 scale per token row of A, one per (expert, output channel)
  of B; a per-expert scale is repeated over its channels), on the same e4m3 weight values
  and scales as jaxmoe's layer, and activations rounded per token as jaxmoe rounds them
  (``jaxmoe.quantize.quantize_activations``) before each GEMM.

The layer: router matmul (fp32 logits), routing with the contract of :func:`jaxmoe.route`
(every scoring mode, groups, correction bias, renormalisation, scaling), the ``M*k`` rows
sorted by expert (stable) and gathered, GEMM 1, the activation of its bf16 output in fp32
rounded to the input dtype, GEMM 2, the routing weights, the sum over each token's ``k``
rows in fp32. Nothing in it waits on the host (the counts per expert come from a
``scatter_add``, not ``bincount``), so a chain of layers can be recorded as a CUDA graph.

Timed as the bench times the JAX layers (:func:`jaxmoe.tools.bench.time_layer_detail`): two
chains of ``SHORT`` and ``SETS`` layers over the same input batches as a residual stream,
in alternation, the median paired difference per added layer. Each chain is recorded once
as a CUDA graph and replayed, so Python's per-operation dispatch is not timed (the JAX
layers run inside ``jax.jit``); where recording fails the chain runs eagerly and the
progress line says so. Before timing, the peer's output for the first batch is compared
with jaxmoe's; a peer that disagrees beyond :data:`TOLERANCE` is reported as such, untimed.

torch is not a dependency of jaxmoe: the peer runs where ``import torch`` works and torch
sees the device JAX runs on (CUDA or ROCm; on a CPU, the CPU). Arrays pass from JAX by
DLPack, without copies on a GPU. JAX preallocates most of a GPU's memory at start-up: set
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` to leave torch room (``bench`` sets it when the peer
is asked for before JAX starts).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["NAME", "FP8_SCHEMES", "TOLERANCE", "quant_label", "unavailable", "TorchLayer", "route",
           "quantize_rows", "time_chains"]

NAME = "torch"
# Weight schemes with a torch kernel, with act_quant="fp8": row-wise scales on both sides.
FP8_SCHEMES = ("fp8", "fp8_tensor")
# ||peer - jaxmoe|| / ||jaxmoe|| over the first batch's layer output. bf16: both sum in fp32
# and round once or twice to bf16 (2^-8 each), the peer rounding GEMM 1's output before the
# activation. fp8: the same roundings, and an element of h that lands on the other side of
# an e4m3 rounding boundary moves by one e4m3 step (2^-3 relative) in one of them.
TOLERANCE = {"bf16": 2e-2, "fp8": 5e-2}


def quant_label(quant: str, act_quant: str | None) -> str:
    """The bench's name of the quantized peer row (``torch:<scheme>[+a<act>]``)."""
    return f"{NAME}:{quant}" + (f"+a{act_quant}" if act_quant else "")


def _torch() -> Any:
    import torch

    return torch


def unavailable(device: str, quant: str | None = None, act_quant: str | None = None) -> str | None:
    """Why the peer cannot run here (None when it can): ``device`` is JAX's platform
    (``"gpu"`` or ``"cpu"``); ``quant``/``act_quant`` ask for the quantized peer."""
    try:
        torch = _torch()
    except Exception:  # noqa: BLE001  (not installed, or its libraries are not)
        return "not installed"
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no _grouped_mm"
    if device == "gpu" and not torch.cuda.is_available():
        return "torch sees no GPU"
    if device not in ("gpu", "cpu"):
        return f"no torch device for JAX's {device!r} platform"
    if quant is not None:
        if quant not in FP8_SCHEMES or act_quant != "fp8":
            return (f"torch has no grouped GEMM for {quant} weights" + (f" with act_quant={act_quant}" if act_quant
                                                                        else " with unquantized activations")
                    + f" (its fp8 peer takes {' or '.join(FP8_SCHEMES)} with act_quant=fp8)")
        if not hasattr(torch, "_scaled_grouped_mm"):
            return f"torch {torch.__version__} has no _scaled_grouped_mm"
        if device == "cpu":
            return "torch's _scaled_grouped_mm has no CPU kernel"
    return None


def to_torch(x: jax.Array) -> Any:
    """A JAX array as a torch tensor on the same device (DLPack: no copy); fp8 through a
    uint8 view, which DLPack carries everywhere."""
    torch = _torch()
    dt = jnp.dtype(x.dtype)
    if dt.name.startswith("float8"):
        return torch.from_dlpack(jax.lax.bitcast_convert_type(x, jnp.uint8)).view(getattr(torch, dt.name))
    return torch.from_dlpack(x)


def route(logits: Any, top_k: int, *, scoring: str = "softmax", renormalize: bool = True,
          num_expert_group: int | None = None, topk_group: int | None = None, correction_bias: Any = None,
          routed_scaling_factor: float = 1.0, group_scoring: str | None = None) -> tuple[Any, Any]:
    """torch version of :func:`jaxmoe.route`'s contract: fp32 ``logits [M, E]`` ->
    (``topk_weights [M, k]`` fp32, ``topk_ids [M, k]`` int64). Ties between equal scores
    may pick another id than jaxmoe (torch.topk does not promise the lower index)."""
    from jaxmoe.ops import checks

    torch = _torch()
    m, e = logits.shape
    neg_inf = float("-inf")  # a Python scalar: no host-to-device copy while a graph records
    if scoring == "topk_softmax":
        scores = torch.softmax(logits, dim=-1)
        ids = torch.topk(scores.masked_fill(scores.isnan(), neg_inf), top_k, dim=-1).indices
        weights = torch.softmax(torch.gather(logits, 1, ids), dim=-1) * routed_scaling_factor
        return weights, ids
    scores = torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)
    choice = scores if correction_bias is None else scores + correction_bias.float()
    choice = choice.masked_fill(choice.isnan(), neg_inf)
    if num_expert_group is not None:
        groups = choice.view(m, num_expert_group, e // num_expert_group)
        if checks.resolve_group_scoring(group_scoring, correction_bias) == "max":
            group_scores = groups.amax(dim=-1)
        else:
            group_scores = torch.topk(groups, min(2, groups.shape[-1]), dim=-1).values.sum(dim=-1)
        group_scores = group_scores.masked_fill(group_scores.isnan(), neg_inf)
        kept = torch.topk(group_scores, topk_group, dim=-1).indices
        keep = torch.zeros(m, num_expert_group, dtype=torch.bool, device=logits.device).scatter_(1, kept, True)
        choice = groups.masked_fill(~keep[:, :, None], neg_inf).reshape(m, e)
    ids = torch.topk(choice, top_k, dim=-1).indices
    weights = torch.gather(scores, 1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * routed_scaling_factor, ids


def quantize_rows(x: Any, fp8_dtype: Any) -> tuple[Any, Any]:
    """``x [R, K]`` -> (``q [R, K]`` e4m3, ``scale [R]`` fp32): one scale per row, the
    rounding of :func:`jaxmoe.quantize.quantize_activations` (amax / QMAX, rows of zeros
    scale 0)."""
    from jaxmoe.types import FP8_MAX

    torch = _torch()
    qmax = FP8_MAX[str(fp8_dtype).removeprefix("torch.")]
    xf = x.float()
    amax = xf.abs().amax(dim=1, keepdim=True)
    # tensor / tensor: a Python number over a tensor is a reciprocal times the number on the
    # CPU, an fp32 ulp off jaxmoe's quotient, enough to move a code across a rounding tie
    inv = torch.where(amax > 0, torch.full_like(amax, qmax) / torch.where(amax > 0, amax, 1.0), 0.0)
    q = (xf * inv).clamp(-qmax, qmax).to(fp8_dtype)
    return q, (amax / qmax).squeeze(1)


@dataclasses.dataclass
class TorchLayer:
    """One MoE layer in torch over the bench's parameters (``moe_layer``'s: ``router [D, E]``,
    ``w1 [E, 2I, D]``, ``w2 [E, D, I]``, bf16/fp16 arrays or fp8 ``QuantizedWeights``),
    called as ``layer(x [M, D]) -> [M, D]`` in x's dtype.

    ``grouped_mm`` / ``scaled_grouped_mm`` default to torch's; a test may pass another
    function of the same contract (torch's fp8 one has no CPU kernel)."""

    params: dict[str, Any]
    routing: dict[str, Any]
    grouped_mm: Callable | None = None
    scaled_grouped_mm: Callable | None = None

    def __post_init__(self) -> None:
        from jaxmoe.types import QuantizedWeights

        torch = _torch()
        p = self.params
        self.fp8 = isinstance(p["w1"], QuantizedWeights)
        self.router = to_torch(p["router"])
        if self.fp8:
            w1, w2 = p["w1"], p["w2"]
            self.w1, self.w2 = to_torch(w1.values), to_torch(w2.values)
            e = w1.values.shape[0]
            # per-channel scales [E, N]; a per-expert one repeated over its channels
            self.s1 = to_torch(jnp.broadcast_to(w1.scales.reshape(e, -1), w1.values.shape[:2]).astype(jnp.float32))
            self.s2 = to_torch(jnp.broadcast_to(w2.scales.reshape(e, -1), w2.values.shape[:2]).astype(jnp.float32))
            self.fp8_dtype = self.w1.dtype
        else:
            self.w1, self.w2 = to_torch(p["w1"]), to_torch(p["w2"])
            self.s1 = self.s2 = None
        r = dict(self.routing)
        if r.get("correction_bias") is not None:
            r["correction_bias"] = to_torch(jnp.asarray(r["correction_bias"], jnp.float32))
        self._route = r
        self.num_experts = self.w1.shape[0]
        self._mm = self.grouped_mm or torch._grouped_mm
        self._smm = self.scaled_grouped_mm or getattr(torch, "_scaled_grouped_mm", None)

    def _gemm(self, rows: Any, w: Any, scales: Any, offs: Any, out_dtype: Any) -> Any:
        """rows [R, K] (sorted by expert, ``offs`` the end of each expert's rows) @ w[e].T."""
        if not self.fp8:
            return self._mm(rows, w.transpose(-2, -1), offs=offs)
        q, sa = quantize_rows(rows, self.fp8_dtype)
        return self._smm(q, w.transpose(-2, -1), sa, scales, offs=offs, out_dtype=out_dtype)

    def __call__(self, x: Any) -> Any:
        torch = _torch()
        m, d = x.shape
        logits = x.float() @ self.router.float()
        weights, ids = route(logits, **self._route)
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = torch.sort(flat, stable=True).indices
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        rows = x[order // k]
        gate_up = self._gemm(rows, self.w1, self.s1, offs, x.dtype)
        i = gate_up.shape[1] // 2
        h = (torch.nn.functional.silu(gate_up[:, :i].float()) * gate_up[:, i:].float()).to(x.dtype)
        y = self._gemm(h, self.w2, self.s2, offs, x.dtype).float()
        y = y * weights.reshape(-1)[order][:, None]
        out = torch.zeros(m * k, d, dtype=torch.float32, device=x.device).index_copy_(0, order, y)
        return out.view(m, k, d).sum(dim=1).to(x.dtype)


def relative_error(out: Any, ref: np.ndarray) -> float:
    """||out - ref|| / ||ref|| in float64 (``out`` a torch tensor)."""
    o = out.float().cpu().numpy().astype(np.float64)
    r = np.asarray(ref, np.float64)
    return float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-30))


def _chain(layer: Callable, xs: Any, n: int) -> Any:
    y = None
    for s in range(n):
        y = layer(xs[s] if y is None else xs[s] + y)
    return y


def time_chains(layer: Callable, xs: Any, reps: int, short: int, graphs: bool = True
                ) -> tuple[float, float, Any, str]:
    """(seconds per layer, fixed seconds per chain call, the long chain's output, how it
    ran: ``"CUDA graph"`` or ``"eager (...)"``) for ``layer`` over ``xs [SETS, M, D]``:
    the method of :func:`jaxmoe.tools.bench.time_layer_detail`."""
    torch = _torch()
    sets = xs.shape[0]
    if sets <= short:
        raise ValueError(f"need more than {short} input batches, got {sets}")
    on_gpu = xs.device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    how = "eager"
    runs: list[Callable[[], Any]] = [lambda: _chain(layer, xs, short), lambda: _chain(layer, xs, sets)]
    if on_gpu and graphs:
        try:
            recorded = []
            for n in (short, sets):
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):  # warm-up off the default stream, as torch asks before a capture
                    _chain(layer, xs, n)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    out = _chain(layer, xs, n)
                recorded.append((graph, out))
            runs = [lambda g=g, o=o: (g.replay(), o)[1] for g, o in recorded]
            how = "CUDA graph"
        except Exception as exc:  # noqa: BLE001  (timed eagerly instead, and said so)
            how = f"eager (CUDA graph capture failed: {type(exc).__name__})"
    with torch.no_grad():
        for f in runs:  # warm up
            f()
            f()
        sync()
        t_short, t_long, out = [], [], None
        for _ in range(reps):
            for f, ts in zip(runs, (t_short, t_long)):
                t0 = time.perf_counter()
                out = f()
                sync()
                ts.append(time.perf_counter() - t0)
    if not bool(torch.isfinite(out).all()):
        from jaxmoe.tools.bench import NonFiniteError

        raise NonFiniteError("the timed data hold inf or NaN")
    per_layer = statistics.median(b - a for a, b in zip(t_short, t_long)) / (sets - short)
    if per_layer <= 0:
        return statistics.median(t_long) / sets, 0.0, out, how
    return per_layer, max(statistics.median(t_short) - short * per_layer, 0.0), out, how
