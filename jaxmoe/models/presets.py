"""Shapes and routing of real MoE models, shared by ``check`` and the benchmarks."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["ModelPreset", "PRESETS", "get_preset"]


@dataclasses.dataclass(frozen=True)
class ModelPreset:
    """One MoE layer's shape (``E`` experts, ``k`` per token, hidden ``D``, intermediate ``I``) and routing."""

    name: str
    experts: int
    top_k: int
    hidden: int
    intermediate: int
    scoring: str = "softmax"
    renormalize: bool = True
    num_expert_group: int | None = None
    topk_group: int | None = None
    correction_bias: bool = False
    routed_scaling_factor: float = 1.0
    group_scoring: str | None = None  # None: jaxmoe.route's default rule

    def scaled(self, hidden: int, intermediate: int) -> "ModelPreset":
        """The same experts and routing with smaller matrices (for CPUs)."""
        return dataclasses.replace(self, name=f"{self.name} (D={hidden}, I={intermediate})", hidden=hidden, intermediate=intermediate)

    def routing_kwargs(self, key: jax.Array | None = None) -> dict[str, Any]:
        """Keyword arguments for :func:`jaxmoe.route` / :func:`jaxmoe.moe_layer` (bias drawn from ``key``)."""
        kw: dict[str, Any] = dict(
            top_k=self.top_k,
            scoring=self.scoring,
            renormalize=self.renormalize,
            num_expert_group=self.num_expert_group,
            topk_group=self.topk_group,
            routed_scaling_factor=self.routed_scaling_factor,
        )
        if self.group_scoring is not None:
            kw["group_scoring"] = self.group_scoring
        if self.correction_bias:
            key = jax.random.key(0) if key is None else key
            kw["correction_bias"] = 0.1 * jax.random.normal(key, (self.experts,), jnp.float32)
        return kw


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset("tiny", experts=8, top_k=2, hidden=128, intermediate=256, renormalize=True),
        ModelPreset("mixtral-8x7b", experts=8, top_k=2, hidden=4096, intermediate=14336, renormalize=True),
        ModelPreset(
            "deepseek-v3",
            experts=256,
            top_k=8,
            hidden=7168,
            intermediate=2048,
            scoring="sigmoid",
            renormalize=True,
            num_expert_group=8,
            topk_group=4,
            correction_bias=True,
            routed_scaling_factor=2.5,
            group_scoring="top2_sum",
        ),
        ModelPreset("qwen3-30b-a3b", experts=128, top_k=8, hidden=2048, intermediate=768, renormalize=True),
        ModelPreset("mixtral-8x22b", experts=8, top_k=2, hidden=6144, intermediate=16384, renormalize=True),
        ModelPreset("qwen3-235b-a22b", experts=128, top_k=8, hidden=4096, intermediate=1536, renormalize=True),
        ModelPreset("gpt-oss-120b", experts=128, top_k=4, hidden=2880, intermediate=2880, renormalize=True),
    )
}


def get_preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]
