"""Load one MoE layer of a Hugging Face checkpoint directory into :func:`jaxmoe.moe_layer`'s params.

A checkpoint directory holds ``config.json`` and one or more ``*.safetensors`` files
(sharded ones listed by ``model.safetensors.index.json``). Tensors are read with the
``safetensors`` numpy API (no torch); only the chosen layer's tensors are read.

Layouts produced (see :func:`jaxmoe.init_moe_params`)::

    router [D, E]       <- gate.weight [E, D], transposed
    w1     [E, 2I, D]   <- per expert gate [I, D] rows, then up [I, D] rows
    w2     [E, D, I]    <- per expert down [D, I]
    shared {"w1": [S, 2Is, D], "w2": [S, D, Is]}  <- the shared experts (when the family has them),
                           or with stack_shared=True stacked after the routed ones in w1/w2,
                           split to the routed width (routing_kwargs["shared_experts"]: how many)
    shared_gate [D, 1]  <- shared_expert_gate.weight [1, D] (Qwen2-MoE)

gpt-oss stores its experts otherwise (``experts.gate_up_proj [E, D, 2I]``, gate j at
column 2j and up j at 2j + 1; ``experts.down_proj [E, I, D]``; mxfp4 ones ``[out, in]``
with gate/up rows interleaved): by default they are converted on the host to the layout
above (``b1`` reordered with them), which the kernels and their tuned tables run fastest;
``layout="stored"`` keeps them as stored, read by the layer through
``layout="in_out_interleaved"`` (``"out_in_interleaved"`` for mxfp4) without a copy. ``b1`` /
``b2`` are the experts' biases, ``router_bias`` the router's.

Weights keep the checkpoint's dtype (bf16 or fp32 as stored); a correction bias is fp32.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxmoe.models.shared import split_to_width
from jaxmoe.types import QUANT_BLOCK, QuantizedWeights

__all__ = ["FAMILIES", "CheckpointError", "infer_family", "load_layer"]

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss")

_MODEL_TYPES = {"mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe",
                "deepseek_v3": "deepseek_v3", "gpt_oss": "gpt_oss"}
_ARCHITECTURES = {"MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
                  "Qwen3MoeForCausalLM": "qwen3_moe", "DeepseekV3ForCausalLM": "deepseek_v3",
                  "GptOssForCausalLM": "gpt_oss"}
_RAW_DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
               "I64": np.int64, "I32": np.int32, "U8": np.uint8, "F8_E4M3": ml_dtypes.float8_e4m3fn}


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded: missing files, tensors or config keys."""


# --------------------------------------------------------------------------- reading


def _header(file: Path) -> dict[str, Any]:
    """The JSON header of a ``.safetensors`` file (8-byte little-endian length, then JSON)."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


class _Tensors:
    """Name -> file of every tensor of a checkpoint directory, read on demand."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no 'weight_map'")
            self.files = {name: path / file for name, file in weight_map.items()}
            for file in sorted(set(self.files.values())):
                if not file.is_file():
                    raise CheckpointError(f"{index} names {file.name}, which is not in {path}")
        else:
            shards = sorted(path.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"no *.safetensors file in {path}")
            self.files = {}
            for file in shards:
                for name in _header(file):
                    if name != "__metadata__":
                        self.files[name] = file
        self.path = path
        self._headers: dict[Path, dict[str, Any]] = {}

    def dtype(self, name: str) -> str:
        """The stored dtype name of a tensor (``"BF16"``, ``"F32"``, ``"F8_E4M3"``...)."""
        file = self.files[name]
        if file not in self._headers:  # one header read per shard, however many tensors it holds
            self._headers[file] = _header(file)
        return self._headers[file][name]["dtype"]

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a numpy array of its stored dtype (bf16 as ml_dtypes.bfloat16)."""
        from safetensors import safe_open

        if name not in self.files:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.path}")
        file = self.files[name]
        stored = self.dtype(name)
        try:
            with safe_open(str(file), framework="np") as f:
                value = f.get_tensor(name)
        except (TypeError, ValueError, RuntimeError, AttributeError):
            value = None  # a safetensors build whose numpy API cannot hold this dtype (fp8 in numpy)
        if value is not None and not (stored == "BF16" and value.dtype != ml_dtypes.bfloat16):
            return value
        return self._raw(file, name)

    @staticmethod
    def _raw(file: Path, name: str) -> np.ndarray:
        """Read a tensor's bytes straight from the file and view them in its dtype."""
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            info = json.loads(f.read(n))[name]
            if info["dtype"] not in _RAW_DTYPES:
                raise CheckpointError(f"tensor {name!r} has dtype {info['dtype']}, which the loader cannot read")
            start, end = info["data_offsets"]
            f.seek(8 + n + start)
            data = f.read(end - start)
        return np.frombuffer(data, _RAW_DTYPES[info["dtype"]]).reshape(info["shape"]).copy()


# --------------------------------------------------------------------------- families


@dataclasses.dataclass(frozen=True)
class _Family:
    """Where a family keeps a layer's MoE block and how its config reads."""

    prefix: str  # "model.layers.{L}." + this
    expert: Callable[[int], tuple[str, str, str]]  # expert j -> (gate, up, down) names under prefix
    experts_key: str
    intermediate_key: str


def _hf_expert(j: int) -> tuple[str, str, str]:
    return (f"experts.{j}.gate_proj.weight", f"experts.{j}.up_proj.weight", f"experts.{j}.down_proj.weight")


_FAMILY_LAYOUT = {
    "mixtral": _Family("block_sparse_moe.",
                       lambda j: (f"experts.{j}.w1.weight", f"experts.{j}.w3.weight", f"experts.{j}.w2.weight"),
                       "num_local_experts", "intermediate_size"),
    "qwen2_moe": _Family("mlp.", _hf_expert, "num_experts", "moe_intermediate_size"),
    "qwen3_moe": _Family("mlp.", _hf_expert, "num_experts", "moe_intermediate_size"),
    "deepseek_v3": _Family("mlp.", _hf_expert, "n_routed_experts", "moe_intermediate_size"),
    # experts stacked in three tensors, not one per expert (see _load_gpt_oss)
    "gpt_oss": _Family("mlp.", lambda j: ("", "", ""), "num_local_experts", "intermediate_size"),
}


def infer_family(config: dict[str, Any]) -> str:
    """The family of a ``config.json`` dict, from ``model_type`` then ``architectures``."""
    family = _MODEL_TYPES.get(config.get("model_type"))
    if family is None:
        for arch in config.get("architectures") or ():
            family = _ARCHITECTURES.get(arch, family)
    if family is None:
        raise CheckpointError(
            f"cannot tell the model family from config.json (model_type={config.get('model_type')!r}, "
            f"architectures={config.get('architectures')!r}); pass family= one of {FAMILIES}")
    return family


def _require(config: dict[str, Any], key: str, family: str) -> Any:
    if key not in config:
        raise CheckpointError(f"config.json of a {family} checkpoint lacks {key!r}")
    return config[key]


def _check_sparse_layer(config: dict[str, Any], family: str, layer: int) -> None:
    """Refuse layers whose MLP is dense (no experts to route)."""
    if family in ("qwen2_moe", "qwen3_moe"):
        step = int(config.get("decoder_sparse_step", 1))
        dense = layer in (config.get("mlp_only_layers") or []) or step < 1 or (layer + 1) % step
        if dense:
            raise CheckpointError(f"layer {layer} of this {family} checkpoint is a dense MLP "
                                  f"(mlp_only_layers / decoder_sparse_step={step}), not an MoE layer")
    elif family == "deepseek_v3":
        first = int(config.get("first_k_dense_replace", 0))
        freq = int(config.get("moe_layer_freq", 1))
        if layer < first or layer % freq:
            raise CheckpointError(f"layer {layer} of this DeepSeek-V3 checkpoint is a dense MLP "
                                  f"(first_k_dense_replace={first}, moe_layer_freq={freq}), not an MoE layer")


def _is_fp8_block_checkpoint(config: dict[str, Any], tensors: _Tensors, base: str) -> bool:
    """Whether the layer's experts are fp8 with 128 x 128 block scales (DeepSeek-V3's
    ``quant_method: "fp8"``, ``weight_scale_inv``); other quantized checkpoints are refused."""
    quant = config.get("quantization_config") or {}
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    scaled = any(name.startswith(base) and name.endswith("weight_scale_inv") for name in tensors.files)
    if method == "fp8" or (method is None and scaled):
        block = list(quant.get("weight_block_size") or [QUANT_BLOCK, QUANT_BLOCK]) if isinstance(quant, dict) else []
        if block != [QUANT_BLOCK, QUANT_BLOCK]:
            raise NotImplementedError(f"fp8 checkpoints with weight_block_size {block} are not supported: "
                                      f"the 'fp8_block' scheme takes {QUANT_BLOCK} x {QUANT_BLOCK} blocks")
        fmt = quant.get("fmt", "e4m3") if isinstance(quant, dict) else "e4m3"
        if fmt != "e4m3":
            raise NotImplementedError(f"fp8 checkpoints in format {fmt!r} are not supported (e4m3 only)")
        return True
    if method is not None and method not in INT4_METHODS:
        raise NotImplementedError(f"quantized checkpoints ({method!r}) are not supported by the loader")
    return False


INT4_METHODS = ("gptq", "awq")


def _int4_checkpoint(config: dict[str, Any]) -> tuple[str, int] | None:
    """``(method, zero_offset)`` for a GPTQ or AWQ 4-bit checkpoint (``quant_method`` "gptq"
    or "awq" in ``quantization_config``), else None; what jaxmoe's ``int4_zp`` cannot hold
    is refused by name."""
    quant = config.get("quantization_config") or {}
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method not in INT4_METHODS:
        return None
    bits = int(quant.get("bits", quant.get("w_bit", 4)))
    if bits != 4:
        raise NotImplementedError(f"{method} checkpoints with {bits}-bit weights are not supported (4-bit only)")
    group = int(quant.get("group_size", quant.get("q_group_size", QUANT_BLOCK)))
    if group != QUANT_BLOCK:
        raise NotImplementedError(f"{method} checkpoints with group_size {group} are not supported: jaxmoe's "
                                  f"int4 groups are {QUANT_BLOCK} values along K")
    if method == "awq":
        version = str(quant.get("version", "gemm")).lower()
        if version != "gemm":
            raise NotImplementedError(f"AWQ checkpoints of version {version!r} are not supported (GEMM packing only)")
        if not quant.get("zero_point", True):
            raise NotImplementedError("AWQ checkpoints without zero points are not supported")
        return method, 0
    fmt = str(quant.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise NotImplementedError(f"GPTQ checkpoint_format {fmt!r} is not supported (gptq or gptq_v2)")
    return method, 0 if fmt == "gptq_v2" else 1


def _int4_linears(tensors: _Tensors, names: list[str], out_features: int, in_features: int, method: str,
                  zero_offset: int) -> QuantizedWeights:
    """GPTQ/AWQ linears (``names`` without their ``.qweight`` suffix), each ``[out, in]``, as
    one ``int4_zp [len(names), out, in]``: their tensors checked, stacked on the host and
    converted once."""
    from jaxmoe.quantize import from_awq, from_gptq

    if in_features % QUANT_BLOCK or out_features % 8:
        raise CheckpointError(f"{names[0]}: 4-bit {method} layers of [out={out_features}, in={in_features}] are "
                              f"not supported: in must be a multiple of {QUANT_BLOCK}, out of 8")
    groups = in_features // QUANT_BLOCK
    packed = (in_features // 8, out_features) if method == "gptq" else (in_features, out_features // 8)
    parts: dict[str, list[np.ndarray]] = {"qweight": [], "qzeros": [], "scales": []}
    for name in names:
        for part, shape in (("qweight", packed), ("qzeros", (groups, out_features // 8)),
                            ("scales", (groups, out_features))):
            t = _expect(tensors, f"{name}.{part}", shape)
            if part != "scales" and t.dtype != np.int32:
                raise CheckpointError(f"{name}.{part} is {t.dtype}, expected int32 words of 8 nibbles")
            parts[part].append(t)
        if method == "gptq" and (name + ".g_idx") in tensors:
            g_idx = tensors.get(name + ".g_idx")
            if not np.array_equal(np.asarray(g_idx).reshape(-1), np.arange(in_features) // QUANT_BLOCK):
                raise NotImplementedError(f"{name}: act-order GPTQ (a g_idx that permutes the groups, desc_act) "
                                          "is not supported")
    qweight, qzeros, scales = (np.stack(parts[p]) for p in ("qweight", "qzeros", "scales"))
    if method == "gptq":
        return from_gptq(qweight, scales, qzeros, zero_offset=zero_offset)
    return from_awq(qweight, scales, qzeros)


def _stack_int4_mlps(tensors: _Tensors, names: list[tuple[str, str, str]], i: int, d: int, method: str,
                     zero_offset: int) -> tuple[QuantizedWeights, QuantizedWeights]:
    """``w1 [N, 2I, D]`` (gate rows, then up rows) and ``w2 [N, D, I]`` as ``int4_zp`` from N
    GPTQ/AWQ (gate, up, down) linears, the stored nibbles, scales and zero points kept."""
    gate, up, down = ([triple[j] for triple in names] for j in range(3))
    g, u = (_int4_linears(tensors, n, i, d, method, zero_offset) for n in (gate, up))
    w1 = QuantizedWeights(values=jnp.concatenate([g.values, u.values], 1),
                          scales=jnp.concatenate([g.scales, u.scales], 1), scheme="int4_zp",
                          zero_points=jnp.concatenate([g.zero_points, u.zero_points], 1))
    return w1, _int4_linears(tensors, down, d, i, method, zero_offset)


def _check_fp8_tensor(tensors: _Tensors, name: str) -> None:
    """An fp8 checkpoint's ``name`` (a ``.weight``) is e4m3 and has its ``.weight_scale_inv``."""
    if tensors.dtype(name) != "F8_E4M3":
        raise CheckpointError(f"tensor {name!r} is {tensors.dtype(name)}, but this checkpoint's experts "
                              "are fp8 (F8_E4M3 with weight_scale_inv)")
    if name + "_scale_inv" not in tensors:
        raise CheckpointError(f"tensor {name!r} has no {name}_scale_inv")


def _dequantized_fp8(tensors: _Tensors, name: str) -> np.ndarray:
    """An fp8 ``.weight [out, in]`` times its ``.weight_scale_inv`` blocks, in float32."""
    _check_fp8_tensor(tensors, name)
    values = tensors.get(name).astype(np.float32)
    scales = tensors.get(name + "_scale_inv").astype(np.float32)
    blocks = tuple(-(-n // QUANT_BLOCK) for n in values.shape)
    if values.ndim != 2 or scales.shape != blocks:
        raise CheckpointError(f"tensor {name + '_scale_inv'!r} is {list(scales.shape)}, expected {list(blocks)} "
                              f"blocks for {name!r} {list(values.shape)}")
    full = np.repeat(np.repeat(scales, QUANT_BLOCK, axis=0), QUANT_BLOCK, axis=1)
    return values * full[: values.shape[0], : values.shape[1]]


def _stack_fp8_mlps(tensors: _Tensors, names: list[tuple[str, str, str]]) -> tuple[Any, Any]:
    """``w1 [N, 2I, D]`` and ``w2 [N, D, I]`` as ``"fp8_block"`` weights from N (gate, up,
    down) names, each an e4m3 ``.weight`` with its ``.weight_scale_inv [ceil(out / 128),
    ceil(in / 128)]`` fp32 block scales (dequantized weight = value x scale, as stored). The
    values keep their bits, converted only where the default platform's kernels multiply
    another fp8 type (e4m3fnuz on MI300: exact, the scales doubled), once, here."""
    from jaxmoe.backends.platform import fp8_dtype
    from jaxmoe.quantize import with_fp8_dtype

    for name in (n for triple in names for n in triple):
        _check_fp8_tensor(tensors, name)
    w1, w2 = _stack_mlps(tensors, names)
    i = w1.shape[1] // 2
    if i % QUANT_BLOCK:
        raise CheckpointError(f"fp8 experts with an intermediate size of {i} are not supported: gate and up "
                              f"share w1's {QUANT_BLOCK}-row scale blocks, so it must be a multiple of "
                              f"{QUANT_BLOCK}")
    # the scales stack as the values do: [ceil(I/128), ceil(D/128)] twice, then [ceil(D/128), ceil(I/128)]
    s1, s2 = _stack_mlps(tensors, [tuple(n + "_scale_inv" for n in triple) for triple in names])
    for what, w, sc in (("gate/up", w1, s1), ("down", w2, s2)):
        want = (w.shape[0], -(-w.shape[1] // QUANT_BLOCK), -(-w.shape[2] // QUANT_BLOCK))
        if tuple(sc.shape) != want:
            raise CheckpointError(f"the {what} weight_scale_inv blocks are {list(sc.shape[1:])} per expert, "
                                  f"expected {list(want[1:])}")
    out = []
    for values, scales in ((w1, s1), (w2, s2)):
        q = QuantizedWeights(values=jnp.asarray(values), scales=jnp.asarray(scales, jnp.float32), scheme="fp8_block")
        out.append(with_fp8_dtype(q, fp8_dtype()))
    return out[0], out[1]


def _stack_mlps(tensors: _Tensors, names: list[tuple[str, str, str]],
                append: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``w1 [N, 2I, D]`` (gate rows, then up rows) and ``w2 [N, D, I]`` from N (gate, up, down)
    names of ``[I, D]``, ``[I, D]`` and ``[D, I]`` tensors (or of their block scales), then the
    experts of ``append`` (``[A, 2I, D]``, ``[A, D, I]``) as rows ``N ..``."""
    first = tensors.get(names[0][0])
    if first.ndim != 2:
        raise CheckpointError(f"tensor {names[0][0]!r} is {list(first.shape)}, expected 2-D")
    i, d = first.shape
    extra = 0 if append is None else append[0].shape[0]
    w1 = np.empty((len(names) + extra, 2 * i, d), first.dtype)  # filled in place: one copy of the experts
    w2 = np.empty((len(names) + extra, d, i), first.dtype)
    if extra:
        w1[len(names):], w2[len(names):] = append
    for j, (gate, up, down) in enumerate(names):
        for name, dst, shape in ((gate, w1[j, :i], (i, d)), (up, w1[j, i:], (i, d)), (down, w2[j], (d, i))):
            value = first if j == 0 and name == gate else tensors.get(name)
            if value.shape != shape or value.dtype != first.dtype:
                raise CheckpointError(f"tensor {name!r} is {value.dtype}{list(value.shape)}, "
                                      f"expected {first.dtype}{list(shape)}")
            dst[...] = value
    return w1, w2


def _expect(tensors: _Tensors, name: str, shape: tuple[int, ...]) -> np.ndarray:
    value = tensors.get(name)
    if tuple(value.shape) != tuple(shape):
        raise CheckpointError(f"tensor {name!r} is {list(value.shape)}, expected {list(shape)}")
    return value


def _mxfp4_weights(blocks: np.ndarray, scales: np.ndarray, name: str) -> Any:
    """gpt-oss's mxfp4 experts (``*_blocks [E, N, K/32, 16]`` uint8, two e2m1 values a byte;
    ``*_scales [E, N, K/32]`` uint8 e8m0 exponents; ``[out, in]``, gate/up interleaved) as
    quantized weights: the one call the ``"mxfp4"`` weight scheme plugs into."""
    from jaxmoe.quantize import from_mxfp4

    return from_mxfp4(jnp.asarray(blocks), jnp.asarray(scales))


def _load_gpt_oss(config: dict[str, Any], tensors: _Tensors, base: str, num_experts: int, stored: bool
                  ) -> tuple[dict[str, Any], str]:
    """gpt-oss's MoE block: ``(params, layout)``; the experts as stored (``stored``: no
    copy), else converted on the host to ``"out_in"`` (gate rows then up rows, ``[out, in]``)."""
    d = int(_require(config, "hidden_size", "gpt_oss"))
    i = int(_require(config, "intermediate_size", "gpt_oss"))
    e = num_experts
    # the interleaved 2I axis (gate j at 2j, up j at 2j + 1) as gate rows then up rows
    gate_then_up = slice(None) if stored else np.concatenate([np.arange(0, 2 * i, 2), np.arange(1, 2 * i, 2)])
    router = _expect(tensors, base + "router.weight", (e, d))
    params: dict[str, Any] = {
        "router": jnp.asarray(router.T),
        "router_bias": jnp.asarray(_expect(tensors, base + "router.bias", (e,))),
        "b1": jnp.asarray(_expect(tensors, base + "experts.gate_up_proj_bias", (e, 2 * i))[:, gate_then_up]),
        "b2": jnp.asarray(_expect(tensors, base + "experts.down_proj_bias", (e, d))),
    }
    quant = config.get("quantization_config") or {}
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method == "mxfp4" or (base + "experts.gate_up_proj_blocks") in tensors:
        # [out, in] already: only the gate/up rows (and their scales) are reordered
        w1 = _mxfp4_weights(
            _expect(tensors, base + "experts.gate_up_proj_blocks", (e, 2 * i, d // 32, 16))[:, gate_then_up],
            _expect(tensors, base + "experts.gate_up_proj_scales", (e, 2 * i, d // 32))[:, gate_then_up],
            base + "experts.gate_up_proj")
        w2 = _mxfp4_weights(_expect(tensors, base + "experts.down_proj_blocks", (e, d, i // 32, 16)),
                            _expect(tensors, base + "experts.down_proj_scales", (e, d, i // 32)),
                            base + "experts.down_proj")
        params.update(w1=w1, w2=w2)
        return params, "out_in_interleaved" if stored else "out_in"
    if method is not None:
        raise NotImplementedError(f"quantized gpt-oss checkpoints ({method!r}) are not supported by the loader")
    w1 = _expect(tensors, base + "experts.gate_up_proj", (e, d, 2 * i))
    w2 = _expect(tensors, base + "experts.down_proj", (e, i, d))
    if w2.dtype != w1.dtype:
        raise CheckpointError(f"{base}experts.down_proj is {w2.dtype}, gate_up_proj {w1.dtype}: they must agree")
    if stored:
        params.update(w1=jnp.asarray(w1), w2=jnp.asarray(w2))
        return params, "in_out_interleaved"
    # one host copy each: [E, D, 2I] -> [E, 2I, D] with the rows reordered, [E, I, D] -> [E, D, I]
    params.update(w1=jnp.asarray(np.swapaxes(w1, 1, 2)[:, gate_then_up]),
                  w2=jnp.asarray(np.ascontiguousarray(np.swapaxes(w2, 1, 2))))
    return params, "out_in"


LAYOUTS = ("out_in", "stored")


def load_layer(path: str | os.PathLike, family: str | None = None, *, layer: int, layout: str = "out_in",
               stack_shared: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """One MoE layer of a checkpoint directory, ready for :func:`jaxmoe.moe_layer`.

    Args:
      path: a directory with ``config.json`` and ``*.safetensors`` (sharded files listed by
        ``model.safetensors.index.json``).
      family: ``"mixtral"``, ``"qwen2_moe"``, ``"qwen3_moe"``, ``"deepseek_v3"`` or ``"gpt_oss"``;
        None reads it from config.json's ``model_type`` (then ``architectures``).
      layer: the decoder layer index ``L`` (``model.layers.L.*``), a Python int.
      layout: ``"out_in"`` (experts as ``w1 [E, 2I, D]`` gate rows then up rows and
        ``w2 [E, D, I]``, converted on the host where the checkpoint stores them otherwise:
        gpt-oss) or ``"stored"`` (gpt-oss's experts as the file holds them, no copy, read
        through the returned ``layout``: on an H200 at gpt-oss-120b's shapes the bf16 layer
        runs 11 % (M = 4096) to 23 % (M = 1) slower so).
        The other families are stored per expert and stacked ``"out_in"`` either way.
      stack_shared: False (the default): shared experts (Qwen2-MoE, DeepSeek-V3) load as
        ``params["shared"]``, a dense MLP beside the routed launches (on the H200 the faster
        form at DeepSeek-V3's shape). True: stacked after the routed ones in ``w1``/``w2``,
        split to the routed width, with ``routing_kwargs["shared_experts"]`` saying how many
        (see :func:`jaxmoe.models.stack_shared_experts`), so the layer takes them in its
        routed launches; where they cannot be (fp8 checkpoints, whose shared expert is
        dequantized; a shared width that is not a multiple of the routed one) they load as
        ``params["shared"]`` all the same.

    Returns ``(params, routing_kwargs)``: ``params`` holds ``router [D, E]``, ``w1 [E, 2I, D]``,
    ``w2 [E, D, I]`` in the checkpoint's dtype (``shared`` for Qwen2-MoE and DeepSeek-V3, or
    ``[E + S, ...]`` with S stacked shared experts; ``shared_gate`` for Qwen2-MoE), as jax arrays;
    ``routing_kwargs`` holds ``shared_experts`` (0 without stacked ones), ``top_k``,
    ``scoring``, ``renormalize``, ``num_expert_group``, ``topk_group``, ``correction_bias``
    (``[E]`` float32 or None), ``routed_scaling_factor``, ``group_scoring``, ``activation``
    and ``layout``, so ``moe_layer(params, x, **routing_kwargs)`` computes the family's MoE
    block. gpt-oss also has ``b1``, ``b2``, ``router_bias``, ``scoring="topk_softmax"`` and
    ``activation=ClampedSwiGLU(swiglu_alpha, swiglu_limit)``; with ``layout="stored"``
    ``w1 [E, D, 2I]`` and ``w2 [E, I, D]`` as stored (``"in_out_interleaved"``).

    Raises :class:`CheckpointError` (a ValueError) for a bad directory, config or missing
    tensor, or for a dense layer; NotImplementedError for quantized checkpoints other than
    fp8 with 128 x 128 block scales, GPTQ / AWQ 4-bit with groups of 128 (not act-order),
    and gpt-oss's mxfp4.

    Quantized checkpoints load without a dequantized copy of the experts: fp8 ones
    (``quant_method: "fp8"``, e4m3 ``.weight`` with ``.weight_scale_inv`` blocks, as
    DeepSeek-V3 and Qwen3's FP8 releases ship) as ``"fp8_block"`` weights, in the fp8 type
    the default platform's kernels multiply (converted once here on MI300: exact); shared
    experts, a dense path, dequantized to the router's dtype. GPTQ and AWQ 4-bit experts
    (``qweight`` / ``qzeros`` / ``scales``) load as ``"int4_zp"`` weights (their shared
    expert dequantized to the router's dtype). gpt-oss's mxfp4 ``*_blocks`` / ``*_scales``
    load as ``"mxfp4"`` weights.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} must hold a JSON object")
    family = infer_family(config) if family is None else family
    if family not in FAMILIES:
        raise CheckpointError(f"unknown family {family!r}; known: {FAMILIES}")
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise TypeError(f"layer must be an int, got {type(layer).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    num_layers = config.get("num_hidden_layers")
    if layer < 0 or (num_layers is not None and layer >= num_layers):
        raise CheckpointError(f"layer {layer} is out of range: the checkpoint has {num_layers} layers")
    _check_sparse_layer(config, family, layer)

    fam = _FAMILY_LAYOUT[family]
    num_experts = int(_require(config, fam.experts_key, family))
    top_k = int(_require(config, "num_experts_per_tok", family))
    tensors = _Tensors(path)
    base = f"model.layers.{layer}.{fam.prefix}"
    if family == "gpt_oss":
        from jaxmoe.types import ClampedSwiGLU

        params, expert_layout = _load_gpt_oss(config, tensors, base, num_experts, stored=layout == "stored")
        activation = ClampedSwiGLU(alpha=float(config.get("swiglu_alpha", 1.702)),
                                   limit=float(config.get("swiglu_limit", 7.0)))
        return params, dict(top_k=top_k, scoring="topk_softmax", renormalize=True, num_expert_group=None,
                            topk_group=None, correction_bias=None, routed_scaling_factor=1.0, group_scoring=None,
                            activation=activation, layout=expert_layout, shared_experts=0)
    fp8 = _is_fp8_block_checkpoint(config, tensors, base)
    int4 = _int4_checkpoint(config)

    router = tensors.get(base + "gate.weight")
    if router.ndim != 2 or router.shape[0] != num_experts:
        raise CheckpointError(f"{base}gate.weight is {list(router.shape)}, expected [E={num_experts}, D]")
    experts = [tuple(base + n for n in fam.expert(j)) for j in range(num_experts)]
    params: dict[str, Any] = {"router": jnp.asarray(router.T)}
    # Shared experts run in the activations' dtype: the experts' own, or for fp8 and 4-bit
    # experts the router's (bf16 / fp16 in the published checkpoints), dequantized once here.
    if int4 is not None:
        experts = [tuple(n.removesuffix(".weight") for n in triple) for triple in experts]
        i_int4 = int(_require(config, fam.intermediate_key, family))
        first_gate = np.empty((i_int4, router.shape[1]), router.dtype)  # [I, D]: the shapes only
    else:
        first_gate = tensors.get(experts[0][0])  # [I, D]
    dense = router.dtype if (fp8 or int4 is not None) else first_gate.dtype
    shared_names = None
    if family == "qwen2_moe" and any(base + "shared_expert.gate_proj." + part in tensors
                                     for part in ("weight", "qweight")):
        shared_names = tuple(base + f"shared_expert.{n}_proj.weight" for n in ("gate", "up", "down"))
    if family == "deepseek_v3" and int(config.get("n_shared_experts") or 0) > 0:
        shared_names = tuple(base + f"shared_experts.{n}_proj.weight" for n in ("gate", "up", "down"))
    stacked, append = 0, None
    if fp8:
        w1, w2 = _stack_fp8_mlps(tensors, experts)
    if int4 is not None:
        i, d = first_gate.shape
        w1, w2 = _stack_int4_mlps(tensors, experts, i, d, *int4)
    shared_loaded = False
    if shared_names is not None and int4 is not None:
        shared = [n.removesuffix(".weight") for n in shared_names]
        if (shared[0] + ".qweight") in tensors:  # quantized too: a dense path, dequantized here
            width = int(tensors.get(shared[0] + ".scales").shape[1])  # the shared expert's intermediate size
            g, u = (_int4_linears(tensors, [n], width, d, *int4) for n in shared[:2])
            dn = _int4_linears(tensors, [shared[2]], d, width, *int4)
            params["shared"] = {"w1": jnp.concatenate([g.dequantize(), u.dequantize()], 1).astype(dense),
                                "w2": dn.dequantize().astype(dense)}
            shared_loaded = True
    if shared_names is not None and not shared_loaded:
        if fp8:  # a dense path: each tensor dequantized on its own, whatever its block alignment
            gate, up, down = (_dequantized_fp8(tensors, n) for n in shared_names)
            if gate.shape != up.shape or down.shape != gate.shape[::-1]:
                raise CheckpointError(f"shared expert tensors {shared_names} are {gate.shape}, {up.shape}, "
                                      f"{down.shape}: expected [I, D], [I, D], [D, I]")
            params["shared"] = {"w1": jnp.asarray(np.concatenate([gate, up])[None].astype(dense)),
                                "w2": jnp.asarray(down[None].astype(dense))}
        else:
            sw1, sw2 = _stack_mlps(tensors, [shared_names])
            sw1, sw2 = sw1.astype(dense), sw2.astype(dense)
            i, d = first_gate.shape
            if stack_shared and (sw1.shape[1] // 2) % i == 0 and sw1.shape[2] == d:
                append = split_to_width(sw1, sw2, i)  # after the routed experts, in their one host copy
                stacked = append[0].shape[0]
            else:
                params["shared"] = {"w1": jnp.asarray(sw1), "w2": jnp.asarray(sw2)}
    if not fp8 and int4 is None:
        w1, w2 = map(jnp.asarray, _stack_mlps(tensors, experts, append))
    if w1.shape[2] != router.shape[1]:
        raise CheckpointError(f"experts have D={w1.shape[2]} but the router has D={router.shape[1]}")
    params.update(w1=w1, w2=w2)

    routing: dict[str, Any] = dict(top_k=top_k, scoring="softmax", renormalize=True, num_expert_group=None,
                                   topk_group=None, correction_bias=None, routed_scaling_factor=1.0,
                                   group_scoring=None, activation="silu", layout="out_in", shared_experts=stacked)

    if family in ("qwen2_moe", "qwen3_moe"):
        # norm_topk_prob defaults to False in both Qwen configs
        routing["renormalize"] = bool(config.get("norm_topk_prob", False))
    if family == "qwen2_moe" and shared_names is not None:
        gate = tensors.get(base + "shared_expert_gate.weight")
        if gate.shape != (1, w1.shape[2]):
            raise CheckpointError(f"{base}shared_expert_gate.weight is {list(gate.shape)}, expected [1, D]")
        params["shared_gate"] = jnp.asarray(gate.T)
    if family == "deepseek_v3":
        scoring = config.get("scoring_func", "sigmoid")
        if scoring not in ("sigmoid", "softmax"):
            raise CheckpointError(f"unsupported scoring_func {scoring!r}")
        n_group, topk_group = config.get("n_group"), config.get("topk_group")
        bias = tensors.get(base + "gate.e_score_correction_bias").astype(np.float32)
        routing.update(scoring=scoring, renormalize=bool(config.get("norm_topk_prob", True)),
                       correction_bias=jnp.asarray(bias),
                       routed_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
                       group_scoring="top2_sum")
        if n_group is not None and topk_group is not None and int(n_group) > 1:
            routing.update(num_expert_group=int(n_group), topk_group=int(topk_group))
    return params, routing
