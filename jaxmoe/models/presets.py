"""Shapes and routing of real MoE models, shared by ``check`` and the benchmarks."""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["ModelPreset", "PRESETS", "get_preset", "from_hf_config"]


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


# Field names of the MoE layer in Hugging Face ``config.json`` files, first match wins.
HF_EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts")
HF_TOP_K = ("num_experts_per_tok",)
HF_HIDDEN = ("hidden_size",)
HF_INTERMEDIATE = ("moe_intermediate_size", "intermediate_size")


def from_hf_config(config: str | os.PathLike | Mapping[str, Any], name: str | None = None) -> ModelPreset:
    """The MoE layer of a Hugging Face model config (a ``config.json`` path or its dict).

    Reads ``E`` from ``num_local_experts`` (Mixtral), ``num_experts`` (Qwen-MoE) or
    ``n_routed_experts`` (DeepSeek), ``k`` from ``num_experts_per_tok``, ``D`` from
    ``hidden_size`` and ``I`` from ``moe_intermediate_size``, else ``intermediate_size``;
    a ``text_config`` section is used when the top level has no experts. DeepSeek-style
    routing is kept where the config says so: ``scoring_func``, ``n_group``/``topk_group``,
    ``routed_scaling_factor``, ``norm_topk_prob`` and a correction bias for
    ``topk_method = "noaux_tc"``. Raises ``ValueError`` naming the file and the field.
    """
    where = "config"
    if not isinstance(config, Mapping):
        where = os.fspath(config)
        try:
            with open(where, encoding="utf-8") as f:
                config = json.load(f)
        except OSError as err:
            raise ValueError(f"{where}: cannot read the model config: {err.strerror or err}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{where}: not valid JSON: {err}") from None
        if not isinstance(config, Mapping):
            raise ValueError(f"{where}: a model config must be a JSON object, got {type(config).__name__}")
    if not any(k in config for k in HF_EXPERTS) and isinstance(config.get("text_config"), Mapping):
        config = config["text_config"]

    def field(names: tuple[str, ...]) -> int:
        for key in names:
            if config.get(key) is not None:
                v = config[key]
                if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
                    raise ValueError(f"{where}: {key} must be a positive integer, got {v!r}")
                return int(v)
        raise ValueError(f"{where}: no {' / '.join(names)} field: not a mixture-of-experts model config?")

    experts, top_k = field(HF_EXPERTS), field(HF_TOP_K)
    hidden, intermediate = field(HF_HIDDEN), field(HF_INTERMEDIATE)
    if top_k > experts:
        raise ValueError(f"{where}: num_experts_per_tok = {top_k} exceeds the {experts} experts")
    scoring = config.get("scoring_func", "softmax")
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"{where}: scoring_func {scoring!r} is not supported (softmax or sigmoid)")
    groups = config.get("n_group")
    grouped = isinstance(groups, int) and groups > 1
    scale = config.get("routed_scaling_factor", 1.0)
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise ValueError(f"{where}: routed_scaling_factor must be a number, got {scale!r}")
    label = name or str(config.get("model_type") or os.path.basename(where))
    preset = ModelPreset(
        label, experts=experts, top_k=top_k, hidden=hidden, intermediate=intermediate, scoring=scoring,
        renormalize=bool(config.get("norm_topk_prob", True)),
        num_expert_group=groups if grouped else None, topk_group=config.get("topk_group") if grouped else None,
        correction_bias=config.get("topk_method") == "noaux_tc", routed_scaling_factor=float(scale))
    if grouped:  # the same rules as jaxmoe.route's
        from jaxmoe.ops.checks import check_route_args

        class _Logits:
            shape, dtype = (1, experts), "float32"

        try:
            check_route_args(_Logits(), top_k, num_expert_group=groups, topk_group=preset.topk_group)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: n_group / topk_group: {err}") from None
    return preset
