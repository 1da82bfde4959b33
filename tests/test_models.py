"""Checkpoint loading: ``jaxmoe.models.load_layer`` on tiny random checkpoints written here
with each family's tensor names, shapes, dtypes and config keys, run through ``moe_layer``
and held to a float64 numpy model of each family's MoE block, written from the published
modelling code's semantics (not from jaxmoe's reference)."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

safetensors_numpy = pytest.importorskip("safetensors.numpy")

import jaxmoe  # noqa: E402
import oracle  # noqa: E402
from conftest import pack_words, rel_err, to_f64, tolerance  # noqa: E402
from jaxmoe.models import CheckpointError, infer_family, load_layer  # noqa: E402

D, I, IS, M = 32, 16, 24, 6  # hidden, expert intermediate, shared intermediate, tokens
NP_DTYPES = {"fp32": np.float32, "bf16": ml_dtypes.bfloat16}

CONFIGS = {
    "mixtral": dict(model_type="mixtral", architectures=["MixtralForCausalLM"], hidden_size=D,
                    intermediate_size=I, num_local_experts=8, num_experts_per_tok=2, num_hidden_layers=2),
    "qwen3_moe": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=D,
                      moe_intermediate_size=I, num_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
                      decoder_sparse_step=1, mlp_only_layers=[]),  # norm_topk_prob left to its default: False
    "qwen2_moe": dict(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], hidden_size=D,
                      moe_intermediate_size=I, shared_expert_intermediate_size=IS, num_experts=8,
                      num_experts_per_tok=2, num_hidden_layers=2, norm_topk_prob=True, decoder_sparse_step=1,
                      mlp_only_layers=[]),
    "deepseek_v3": dict(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], hidden_size=D,
                        intermediate_size=48, moe_intermediate_size=I, n_routed_experts=16, n_shared_experts=1,
                        num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                        norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc",
                        first_k_dense_replace=1, moe_layer_freq=1, num_hidden_layers=2),
    # swiglu_alpha is not in the published configs (the code's 1.702 applies); swiglu_limit is
    "gpt_oss": dict(model_type="gpt_oss", architectures=["GptOssForCausalLM"], hidden_size=D, intermediate_size=I,
                    num_local_experts=8, num_experts_per_tok=4, num_hidden_layers=2, swiglu_limit=7.0,
                    layer_types=["sliding_attention", "full_attention"], attention_bias=True),
}
LAYER = 1  # DeepSeek-V3's layer 0 is dense (first_k_dense_replace=1)


def _mlp(rng, prefix, names, inter, dtype):
    gate, up, down = names
    return {f"{prefix}{gate}.weight": (rng.standard_normal((inter, D)) / math.sqrt(D)).astype(dtype),
            f"{prefix}{up}.weight": (rng.standard_normal((inter, D)) / math.sqrt(D)).astype(dtype),
            f"{prefix}{down}.weight": (rng.standard_normal((D, inter)) / math.sqrt(inter)).astype(dtype)}


def make_tensors(rng, family, dtype, shared_i=IS) -> dict[str, np.ndarray]:
    """Every tensor of a 2-layer checkpoint's MLPs (plus an embedding the loader must skip);
    ``shared_i``: Qwen2-MoE's shared expert width."""
    cfg = CONFIGS[family]
    t = {"model.embed_tokens.weight": rng.standard_normal((16, D)).astype(dtype)}
    for layer in range(cfg["num_hidden_layers"]):
        if family == "gpt_oss":
            t.update(gpt_oss_layer(rng, layer, dtype))
            continue
        if family == "mixtral":
            p = f"model.layers.{layer}.block_sparse_moe."
            t[p + "gate.weight"] = rng.standard_normal((8, D)).astype(dtype)
            for j in range(8):
                t.update(_mlp(rng, f"{p}experts.{j}.", ("w1", "w3", "w2"), I, dtype))
            continue
        p = f"model.layers.{layer}.mlp."
        names = ("gate_proj", "up_proj", "down_proj")
        if family == "deepseek_v3" and layer < cfg["first_k_dense_replace"]:
            t.update(_mlp(rng, p, names, cfg["intermediate_size"], dtype))
            continue
        e = cfg.get("num_experts") or cfg["n_routed_experts"]
        t[p + "gate.weight"] = rng.standard_normal((e, D)).astype(dtype)
        for j in range(e):
            t.update(_mlp(rng, f"{p}experts.{j}.", names, I, dtype))
        if family == "qwen2_moe":
            t.update(_mlp(rng, p + "shared_expert.", names, shared_i, dtype))
            t[p + "shared_expert_gate.weight"] = rng.standard_normal((1, D)).astype(dtype)
        if family == "deepseek_v3":
            t[p + "gate.e_score_correction_bias"] = (0.1 * rng.standard_normal(e)).astype(np.float32)
            t.update(_mlp(rng, p + "shared_experts.", names, I * cfg["n_shared_experts"], dtype))
    return t


def gpt_oss_layer(rng, layer, dtype, e=8) -> dict[str, np.ndarray]:
    """gpt-oss's bf16 MoE tensors of one layer, named and shaped as the published checkpoints
    hold them (experts stacked, x @ w orientation, gate/up interleaved on the 2I axis). The
    gate/up weights are scaled so that about a quarter of the pre-activations pass the clamp
    at 7 (gate above, up on both sides)."""
    p = f"model.layers.{layer}.mlp."
    return {
        p + "router.weight": rng.standard_normal((e, D)).astype(dtype),
        p + "router.bias": rng.standard_normal(e).astype(dtype),
        p + "experts.gate_up_proj": (6.0 * rng.standard_normal((e, D, 2 * I)) / math.sqrt(D)).astype(dtype),
        p + "experts.gate_up_proj_bias": rng.standard_normal((e, 2 * I)).astype(dtype),
        p + "experts.down_proj": (rng.standard_normal((e, I, D)) / math.sqrt(I)).astype(dtype),
        p + "experts.down_proj_bias": rng.standard_normal((e, D)).astype(dtype),
    }


def write_checkpoint(path, family, tensors, *, shards=1, config=None):
    """config.json plus one file, or ``shards`` files and model.safetensors.index.json."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(CONFIGS[family] if config is None else config))
    names = sorted(tensors)
    if shards == 1:
        safetensors_numpy.save_file(tensors, str(path / "model.safetensors"))
        return path
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        safetensors_numpy.save_file(part, str(path / file))
        weight_map.update(dict.fromkeys(part, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


# --------------------------------------------------------------------------- float64 models


def _f64(a):
    return np.asarray(a, np.float64)


def _silu(v):
    return v / (1.0 + np.exp(-v))


def _expert(t, prefix, x):
    gate, up, down = (_f64(t[prefix + n]) for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"))
    return (_silu(x @ gate.T) * (x @ up.T)) @ down.T


def _topk(values, k):
    """Indices of the k largest, descending; ties to the lower index (as a stable sort)."""
    return np.argsort(-values, kind="stable")[:k]


def family_block(family, t, x, cfg=None) -> tuple[np.ndarray, np.ndarray]:
    """The family's MoE block on ``x [M, D]`` in float64: ``(y [M, D], topk_ids [M, k])``
    (``cfg``: the checkpoint's config, default ``CONFIGS[family]``)."""
    cfg = CONFIGS[family] if cfg is None else cfg
    x = _f64(x)
    k = cfg["num_experts_per_tok"]
    if family == "gpt_oss":
        p = f"model.layers.{LAYER}.mlp."
        return oracle.gpt_oss_moe(x, *(t[p + n] for n in ("router.weight", "router.bias", "experts.gate_up_proj",
                                                          "experts.gate_up_proj_bias", "experts.down_proj",
                                                          "experts.down_proj_bias")),
                                  k, limit=cfg["swiglu_limit"])
    if family == "mixtral":
        p = f"model.layers.{LAYER}.block_sparse_moe."
        t = {**t, **{f"{p}experts.{j}.{a}.weight": t[f"{p}experts.{j}.{b}.weight"]
                     for j in range(8) for a, b in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))}}
    else:
        p = f"model.layers.{LAYER}.mlp."
    logits = x @ _f64(t[p + "gate.weight"]).T
    y = np.zeros_like(x)
    ids = np.zeros((x.shape[0], k), np.int64)
    for r in range(x.shape[0]):
        if family == "deepseek_v3":
            scores = 1.0 / (1.0 + np.exp(-logits[r]))
            biased = scores + _f64(t[p + "gate.e_score_correction_bias"])
            g = cfg["n_group"]
            groups = biased.reshape(g, -1)
            group_score = np.sort(groups, axis=1)[:, ::-1][:, :2].sum(axis=1)
            keep = np.zeros(g, bool)
            keep[_topk(group_score, cfg["topk_group"])] = True
            masked = np.where(np.repeat(keep, groups.shape[1]), biased, 0.0)  # dropped groups score 0
            chosen = _topk(masked, k)
            w = scores[chosen]
            if cfg["norm_topk_prob"]:
                w = w / (w.sum() + 1e-20)
            w = w * cfg["routed_scaling_factor"]
        else:
            z = np.exp(logits[r] - logits[r].max())
            probs = z / z.sum()
            chosen = _topk(probs, k)
            w = probs[chosen]
            if family == "mixtral" or cfg.get("norm_topk_prob", False):
                w = w / w.sum()
        ids[r] = chosen
        for j, ex in zip(chosen, w):
            y[r] += ex * _expert(t, f"{p}experts.{j}.", x[r:r + 1])[0]
    if family == "qwen2_moe":
        gate = 1.0 / (1.0 + np.exp(-(x @ _f64(t[p + "shared_expert_gate.weight"]).T)))
        y += gate * _expert(t, p + "shared_expert.", x)
    if family == "deepseek_v3":
        y += _expert(t, p + "shared_experts.", x)
    return y, ids


# --------------------------------------------------------------------------- loading and running


def _run(params, routing, x, implementation):
    fn = jax.jit(lambda p, x, b: jaxmoe.moe_layer(p, x, **{**routing, "correction_bias": b},
                                                  implementation=implementation, return_routing=True))
    return jax.device_get(fn(params, x, routing["correction_bias"]))


@pytest.mark.parametrize("implementation", ["reference", "triton"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_family_matches_its_model(tmp_path, rng, family, dtype, implementation):
    tensors = make_tensors(rng, family, NP_DTYPES[dtype])
    path = write_checkpoint(tmp_path / family, family, tensors)
    params, routing = load_layer(path, layer=LAYER)  # family read from config.json
    jdtype = jnp.dtype(NP_DTYPES[dtype])
    assert params["w1"].dtype == jdtype and params["router"].shape[0] == D
    x = jnp.asarray(rng.standard_normal((M, D)), jnp.float32).astype(jdtype)
    y, got = _run(params, routing, x, implementation)
    want_y, want_ids = family_block(family, tensors, to_f64(x))
    assert y.shape == (M, D) and y.dtype == jdtype
    np.testing.assert_array_equal(np.sort(got["topk_ids"], axis=1), np.sort(want_ids, axis=1))
    assert rel_err(y, want_y) <= tolerance(jdtype)


def test_routing_kwargs_per_family(tmp_path, rng):
    expect = {
        "mixtral": dict(top_k=2, scoring="softmax", renormalize=True, num_expert_group=None),
        "qwen3_moe": dict(top_k=2, scoring="softmax", renormalize=False),
        "qwen2_moe": dict(top_k=2, scoring="softmax", renormalize=True),
        "gpt_oss": dict(top_k=4, scoring="topk_softmax", renormalize=True, layout="out_in",
                        activation=jaxmoe.ClampedSwiGLU(1.702, 7.0)),
        "deepseek_v3": dict(top_k=4, scoring="sigmoid", renormalize=True, num_expert_group=4, topk_group=2,
                            routed_scaling_factor=2.5, group_scoring="top2_sum"),
    }
    for family, want in expect.items():
        path = write_checkpoint(tmp_path / family, family, make_tensors(rng, family, np.float32))
        params, routing = load_layer(path, family, layer=LAYER)
        assert {k: routing[k] for k in want} == want, family
        assert ("shared" in params) == (family in ("qwen2_moe", "deepseek_v3"))
        assert routing["shared_experts"] == 0, family
        assert ("shared_gate" in params) == (family == "qwen2_moe")
        assert (routing["correction_bias"] is None) == (family != "deepseek_v3")
    assert params["shared"]["w1"].shape == (1, 2 * I, D) and params["w1"].shape == (16, 2 * I, D)
    # stacked: DeepSeek-V3's shared expert (width I) after the routed ones; Qwen2-MoE's here
    # (width IS = 1.5 I) cannot be split to the routed width and stays beside
    shared = make_tensors(rng, "deepseek_v3", np.float32)
    p = f"model.layers.{LAYER}.mlp.shared_experts."
    params, routing = load_layer(write_checkpoint(tmp_path / "ds", "deepseek_v3", shared), layer=LAYER,
                                 stack_shared=True)
    assert routing["shared_experts"] == 1 and "shared" not in params
    assert params["w1"].shape == (17, 2 * I, D) and params["router"].shape == (D, 16)
    params, routing = load_layer(tmp_path / "qwen2_moe", layer=LAYER, stack_shared=True)
    assert routing["shared_experts"] == 0 and params["shared"]["w1"].shape == (1, 2 * IS, D)
    params, _ = load_layer(tmp_path / "ds", layer=LAYER, stack_shared=True)
    np.testing.assert_array_equal(np.asarray(params["w1"][16, :I]), shared[p + "gate_proj.weight"])
    np.testing.assert_array_equal(np.asarray(params["w1"][16, I:]), shared[p + "up_proj.weight"])
    np.testing.assert_array_equal(np.asarray(params["w2"][16]), shared[p + "down_proj.weight"])


@pytest.mark.parametrize("implementation", ["reference", "triton"])
def test_qwen2_shared_expert_stacked_or_beside(tmp_path, rng, implementation):
    """A Qwen2-MoE shared expert of twice the routed width loads, with ``stack_shared=True``,
    as two stacked experts (its sigmoid gate as their weight) or, by default, beside: both
    compute the family's block."""
    config = {**CONFIGS["qwen2_moe"], "shared_expert_intermediate_size": 2 * I}
    tensors = make_tensors(rng, "qwen2_moe", np.float32, shared_i=2 * I)
    path = write_checkpoint(tmp_path / "qwen2", "qwen2_moe", tensors, config=config)
    stacked, routing = load_layer(path, layer=LAYER, stack_shared=True)
    assert routing["shared_experts"] == 2 and "shared" not in stacked and stacked["w1"].shape == (10, 2 * I, D)
    beside, routing_beside = load_layer(path, layer=LAYER)
    assert routing_beside["shared_experts"] == 0 and beside["shared"]["w1"].shape == (1, 4 * I, D)
    x = jnp.asarray(rng.standard_normal((M, D)), jnp.float32)
    want_y, want_ids = family_block("qwen2_moe", tensors, to_f64(x), config)
    for params, kw in ((stacked, routing), (beside, routing_beside)):
        y, got = _run(params, kw, x, implementation)
        np.testing.assert_array_equal(np.sort(got["topk_ids"], axis=1), np.sort(want_ids, axis=1))
        assert rel_err(y, want_y) <= 1e-5


def test_sharded_checkpoint_and_architectures(tmp_path, rng):
    """An index over three shards loads the same; ``architectures`` alone names the family."""
    tensors = make_tensors(rng, "qwen2_moe", ml_dtypes.bfloat16)
    one, _ = load_layer(write_checkpoint(tmp_path / "one", "qwen2_moe", tensors), layer=LAYER)
    config = {k: v for k, v in CONFIGS["qwen2_moe"].items() if k != "model_type"}
    three, _ = load_layer(write_checkpoint(tmp_path / "three", "qwen2_moe", tensors, shards=3, config=config),
                          layer=LAYER)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(three)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the layout: gate rows then up rows, transposed router and shared gate
    p = f"model.layers.{LAYER}.mlp."
    np.testing.assert_array_equal(np.asarray(one["w1"][3, :I]), tensors[p + "experts.3.gate_proj.weight"])
    np.testing.assert_array_equal(np.asarray(one["w1"][3, I:]), tensors[p + "experts.3.up_proj.weight"])
    np.testing.assert_array_equal(np.asarray(one["w2"][3]), tensors[p + "experts.3.down_proj.weight"])
    np.testing.assert_array_equal(np.asarray(one["router"]), tensors[p + "gate.weight"].T)
    np.testing.assert_array_equal(np.asarray(one["shared_gate"]), tensors[p + "shared_expert_gate.weight"].T)


def test_bf16_without_numpy_bf16_support(tmp_path, rng, monkeypatch):
    """Where safetensors' numpy API cannot return bf16, the raw bytes are viewed as bf16."""
    from safetensors import safe_open as real_safe_open

    import safetensors

    tensors = make_tensors(rng, "mixtral", ml_dtypes.bfloat16)
    path = write_checkpoint(tmp_path / "m", "mixtral", tensors)

    class NoBf16:
        def __init__(self, *a, **kw):
            self.f = real_safe_open(*a, **kw)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, name):
            raise TypeError("data type 'bfloat16' not understood")

    monkeypatch.setattr(safetensors, "safe_open", NoBf16)
    params, _ = load_layer(path, layer=LAYER)
    p = f"model.layers.{LAYER}.block_sparse_moe."
    np.testing.assert_array_equal(np.asarray(params["w2"][5]), tensors[p + "experts.5.w2.weight"])


# --------------------------------------------------------------------------- errors


def test_errors(tmp_path, rng):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_layer(tmp_path / "nowhere", layer=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_layer(tmp_path / "empty", layer=0)
    (tmp_path / "empty" / "config.json").write_text(json.dumps(CONFIGS["mixtral"]))
    with pytest.raises(CheckpointError, match=r"no \*.safetensors"):
        load_layer(tmp_path / "empty", layer=0)
    with pytest.raises(CheckpointError, match="cannot tell the model family"):
        infer_family({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})

    tensors = make_tensors(rng, "deepseek_v3", np.float32)
    path = write_checkpoint(tmp_path / "ds", "deepseek_v3", tensors)
    with pytest.raises(CheckpointError, match="unknown family 'gpt2'"):
        load_layer(path, "gpt2", layer=LAYER)
    with pytest.raises(CheckpointError, match="dense MLP"):
        load_layer(path, layer=0)
    with pytest.raises(CheckpointError, match="out of range"):
        load_layer(path, layer=2)
    with pytest.raises(TypeError, match="layer must be an int"):
        load_layer(path, layer="1")

    missing = dict(tensors)
    del missing[f"model.layers.{LAYER}.mlp.experts.7.up_proj.weight"]
    path = write_checkpoint(tmp_path / "missing", "deepseek_v3", missing)
    with pytest.raises(CheckpointError, match=r"experts\.7\.up_proj\.weight.* missing"):
        load_layer(path, layer=LAYER)

    fp8 = dict(tensors)  # a block scale beside fp32 weights: neither an fp8 nor a plain checkpoint
    fp8[f"model.layers.{LAYER}.mlp.experts.0.up_proj.weight_scale_inv"] = np.ones((1, 1), np.float32)
    path = write_checkpoint(tmp_path / "fp8", "deepseek_v3", fp8)
    with pytest.raises(CheckpointError, match=r"experts\.0\.gate_proj\.weight' is F32, but .* fp8"):
        load_layer(path, layer=LAYER)
    bnb = write_checkpoint(tmp_path / "bnb", "deepseek_v3", tensors,
                           config={**CONFIGS["deepseek_v3"], "quantization_config": {"quant_method": "bitsandbytes"}})
    with pytest.raises(NotImplementedError, match="'bitsandbytes'"):
        load_layer(bnb, layer=LAYER)

    bad_index = write_checkpoint(tmp_path / "index", "mixtral", make_tensors(rng, "mixtral", np.float32), shards=2)
    (bad_index / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names model-00002-of-00002.safetensors"):
        load_layer(bad_index, layer=LAYER)


def test_example_runs(tmp_path, rng):
    """examples/load_layer.py loads a layer and prints the output's shape and norm."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    path = write_checkpoint(tmp_path / "q3", "qwen3_moe", make_tensors(rng, "qwen3_moe", ml_dtypes.bfloat16))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *sys.path])}
    out = subprocess.run([sys.executable, str(root / "examples" / "load_layer.py"), str(path), "--layer", "1",
                          "--implementation", "reference"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "shape=(8, 32) dtype=bfloat16 norm=" in out.stdout
    # an fp8 checkpoint: the experts stay quantized, the tokens are bf16 (the router's dtype)
    fp8 = write_checkpoint(tmp_path / "ds8", "deepseek_v3", deepseek_fp8_tensors(rng, 160, 128, 8), config=FP8_CONFIG)
    out = subprocess.run([sys.executable, str(root / "examples" / "load_layer.py"), str(fp8), "--layer", "1",
                          "--implementation", "reference"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "experts=8 top_k=2 shared=beside" in out.stdout and "shape=(8, 160) dtype=bfloat16 norm=" in out.stdout
    # a bf16 DeepSeek-V3 checkpoint with its shared expert stacked in the routed launches
    ds = write_checkpoint(tmp_path / "ds", "deepseek_v3", make_tensors(rng, "deepseek_v3", ml_dtypes.bfloat16))
    out = subprocess.run([sys.executable, str(root / "examples" / "load_layer.py"), str(ds), "--layer", "1",
                          "--stack-shared"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "experts=16 top_k=4 shared=1 stacked" in out.stdout and "shape=(8, 32) dtype=bfloat16 norm=" in out.stdout


# --------------------------------------------------------------------------- gpt-oss


@pytest.mark.parametrize("layout", ["out_in", "stored"])
def test_gpt_oss_experts_in_either_layout(tmp_path, rng, layout):
    """gpt-oss's experts (gate_up_proj [E, D, 2I], gate/up interleaved; down_proj [E, I, D])
    come back converted to w1 [E, 2I, D] gate rows then up rows and w2 [E, D, I] (b1
    reordered with them), or with layout="stored" as stored, read with
    layout="in_out_interleaved"; both compute the model's block. A swiglu_limit of the
    config reaches the activation."""
    tensors = make_tensors(rng, "gpt_oss", ml_dtypes.bfloat16)
    config = {**CONFIGS["gpt_oss"], "swiglu_limit": 5.5}
    params, routing = load_layer(write_checkpoint(tmp_path / "g", "gpt_oss", tensors, config=config), layer=LAYER,
                                 layout=layout)
    p = f"model.layers.{LAYER}.mlp."
    gate_up, bias = tensors[p + "experts.gate_up_proj"], tensors[p + "experts.gate_up_proj_bias"]
    if layout == "stored":
        want = {"w1": gate_up, "w2": tensors[p + "experts.down_proj"], "b1": bias}
        assert routing["layout"] == "in_out_interleaved"
    else:
        want = {"w1": np.concatenate([gate_up[..., 0::2], gate_up[..., 1::2]], -1).transpose(0, 2, 1),
                "w2": tensors[p + "experts.down_proj"].transpose(0, 2, 1),
                "b1": np.concatenate([bias[:, 0::2], bias[:, 1::2]], -1)}
        assert routing["layout"] == "out_in"
    want.update(b2=tensors[p + "experts.down_proj_bias"], router_bias=tensors[p + "router.bias"])
    for key, value in want.items():
        assert params[key].shape == value.shape and params[key].dtype == jnp.bfloat16, key
        np.testing.assert_array_equal(np.asarray(params[key]), value)
    np.testing.assert_array_equal(np.asarray(params["router"]), tensors[p + "router.weight"].T)
    assert routing["activation"] == jaxmoe.ClampedSwiGLU(1.702, 5.5)
    x = jnp.asarray(rng.standard_normal((M, D)), jnp.float32).astype(jnp.bfloat16)
    y, got = _run(params, routing, x, "reference")
    want_y, want_ids = oracle.gpt_oss_moe(to_f64(x), *(tensors[p + n] for n in (
        "router.weight", "router.bias", "experts.gate_up_proj", "experts.gate_up_proj_bias", "experts.down_proj",
        "experts.down_proj_bias")), 4, limit=5.5)
    np.testing.assert_array_equal(got["topk_ids"], want_ids)  # descending logit order, as the model's topk
    assert rel_err(y, want_y) <= tolerance(jnp.bfloat16)
    with pytest.raises(ValueError, match="layout must be one of"):
        load_layer(tmp_path / "g", layer=LAYER, layout="in_out")


def test_gpt_oss_clamp_is_exercised(rng):
    """The test checkpoint's pre-activations pass the clamp often enough to test it."""
    t = gpt_oss_layer(rng, LAYER, np.float32)
    x = rng.standard_normal((64, D))
    gate_up = np.einsum("md,edn->emn", x, t[f"model.layers.{LAYER}.mlp.experts.gate_up_proj"])
    assert 0.1 < np.mean(gate_up[..., 0::2] > 7.0) + np.mean(np.abs(gate_up[..., 1::2]) > 7.0) < 0.9


def test_gpt_oss_mxfp4_experts_load_as_the_mxfp4_scheme(tmp_path, rng):
    """The mxfp4 form (*_blocks [E, 2I, D/32, 16] / *_scales [E, 2I, D/32] uint8) loads as
    ``QuantizedWeights(scheme="mxfp4")``, its gate/up rows (and their scales) reordered to
    gate rows then up rows, or interleaved as stored with layout="stored"; the layer on the
    kernels matches the layer on the same weights dequantized to bf16, in both layouts."""
    from jaxmoe.quantize import E2M1_VALUES

    i = 32  # mxfp4 blocks are 32 values along K: the intermediate size of this checkpoint
    tensors = make_tensors(rng, "gpt_oss", ml_dtypes.bfloat16)
    p = f"model.layers.{LAYER}.mlp.experts."
    e = CONFIGS["gpt_oss"]["num_local_experts"]
    tensors[p + "gate_up_proj_bias"] = rng.standard_normal((e, 2 * i)).astype(ml_dtypes.bfloat16)
    for name, (n, k) in (("gate_up_proj", (2 * i, D)), ("down_proj", (D, i))):
        del tensors[p + name]
        tensors[p + name + "_blocks"] = rng.integers(0, 256, (e, n, k // 32, 16), dtype=np.uint8)
        tensors[p + name + "_scales"] = rng.integers(118, 124, (e, n, k // 32), dtype=np.uint8)
    config = {**CONFIGS["gpt_oss"], "intermediate_size": i,
              "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}}
    path = write_checkpoint(tmp_path / "mx", "gpt_oss", tensors, config=config)
    stored, stored_routing = load_layer(path, layer=LAYER, layout="stored")
    assert stored_routing["layout"] == "out_in_interleaved"
    params, routing = load_layer(path, layer=LAYER)
    assert params["w1"].scheme == params["w2"].scheme == "mxfp4" and routing["layout"] == "out_in"
    assert params["w1"].shape == (e, 2 * i, D) and params["w2"].shape == (e, D, i)
    # the gate/up rows reordered with their scales: gate j was row 2j, up j row 2j + 1
    w1, w1_stored = np.asarray(params["w1"].dequantize()), np.asarray(stored["w1"].dequantize())
    np.testing.assert_array_equal(w1[:, :i], w1_stored[:, 0::2])
    np.testing.assert_array_equal(w1[:, i:], w1_stored[:, 1::2])
    np.testing.assert_array_equal(np.asarray(params["b1"]),
                                  np.concatenate([np.asarray(stored["b1"])[:, 0::2], np.asarray(stored["b1"])[:, 1::2]], 1))
    blocks, scales = tensors[p + "down_proj_blocks"], tensors[p + "down_proj_scales"].astype(np.float64)
    lut = np.asarray(E2M1_VALUES)
    want = np.stack([lut[blocks & 15], lut[blocks >> 4]], -1).reshape(e, D, i // 32, 32) * 2.0 ** (scales[..., None] - 127)
    np.testing.assert_array_equal(np.asarray(params["w2"].dequantize()), want.reshape(e, D, i).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((5, D)), jnp.bfloat16)
    y = jaxmoe.moe_layer(params, x, **routing, implementation="triton")
    plain = {**params, "w1": params["w1"].dequantize().astype(jnp.bfloat16),
             "w2": params["w2"].dequantize().astype(jnp.bfloat16)}  # exact: e2m1 * 2^e is a bf16 value
    assert rel_err(y, jaxmoe.moe_layer(plain, x, **routing, implementation="reference")) <= 1e-2
    y_stored = jaxmoe.moe_layer(stored, x, **stored_routing, implementation="triton")
    assert rel_err(y_stored, y) <= 1e-2


def deepseek_fp8_tensors(rng, d, i, e, shared_i=None):
    """One DeepSeek-V3 MoE layer as its fp8 release stores it: e4m3 ``.weight`` values with
    fp32 ``.weight_scale_inv [ceil(out / 128), ceil(in / 128)]``, a bf16 router, an fp32
    correction bias; one fp8 shared expert."""
    p = f"model.layers.{LAYER}.mlp."
    t = {p + "gate.weight": rng.standard_normal((e, d)).astype(ml_dtypes.bfloat16),
         p + "gate.e_score_correction_bias": (0.1 * rng.standard_normal(e)).astype(np.float32)}

    def linear(name, n, k):
        t[name + ".weight"] = np.clip(rng.standard_normal((n, k)) * 100, -448, 448).astype(ml_dtypes.float8_e4m3fn)
        blocks = (-(-n // 128), -(-k // 128))
        t[name + ".weight_scale_inv"] = (rng.uniform(0.5, 2.0, blocks) / (100 * math.sqrt(k))).astype(np.float32)

    for prefix, inter in [(f"{p}experts.{j}.", i) for j in range(e)] + [(p + "shared_experts.", shared_i or i)]:
        linear(prefix + "gate_proj", inter, d)
        linear(prefix + "up_proj", inter, d)
        linear(prefix + "down_proj", d, inter)
    return t


# DeepSeek-V3's fp8 release's config keys, at a small shape (D = 160, I = 128, E = 8)
FP8_CONFIG = {**CONFIGS["deepseek_v3"], "hidden_size": 160, "moe_intermediate_size": 128, "n_routed_experts": 8,
              "n_group": 4, "topk_group": 2, "num_experts_per_tok": 2,
              "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}}


def _dequant_fp8(t, name):
    """float32 value x its block's scale, as a checkpoint reader computes it."""
    values, scale = t[name + ".weight"].astype(np.float32), t[name + ".weight_scale_inv"]
    full = np.kron(scale, np.ones((128, 128), np.float32))[: values.shape[0], : values.shape[1]]
    return values * full


def test_deepseek_fp8_experts_load_as_the_fp8_block_scheme(tmp_path, rng):
    """DeepSeek-V3's fp8 release (quant_method "fp8", 128 x 128 weight_scale_inv blocks) loads
    as ``"fp8_block"`` weights holding the stored values and scales (gate and up stacked on
    w1's N), with partial blocks where D is not a multiple of 128; the layer on the kernels
    matches the reference on the same weights dequantized."""
    d, i, e = 160, 128, 8  # D = 1.25 blocks: w1's K and w2's N end in a partial block
    tensors = deepseek_fp8_tensors(rng, d, i, e)
    path = write_checkpoint(tmp_path / "fp8", "deepseek_v3", tensors, config=FP8_CONFIG)
    params, routing = load_layer(path, layer=LAYER)
    w1, w2 = params["w1"], params["w2"]
    assert w1.scheme == w2.scheme == "fp8_block" and w1.shape == (e, 2 * i, d) and w2.shape == (e, d, i)
    assert w1.scales.shape == (e, 2, 2) and w2.scales.shape == (e, 2, 1)
    p = f"model.layers.{LAYER}.mlp."
    want1 = np.stack([np.concatenate([_dequant_fp8(tensors, f"{p}experts.{j}.gate_proj"),
                                      _dequant_fp8(tensors, f"{p}experts.{j}.up_proj")]) for j in range(e)])
    want2 = np.stack([_dequant_fp8(tensors, f"{p}experts.{j}.down_proj") for j in range(e)])
    np.testing.assert_array_equal(np.asarray(w1.dequantize()), want1)
    np.testing.assert_array_equal(np.asarray(w2.dequantize()), want2)
    # the shared expert, a dense path, is dequantized to the router's dtype
    assert params["shared"]["w1"].dtype == jnp.bfloat16
    shared_gate = _dequant_fp8(tensors, p + "shared_experts.gate_proj")
    np.testing.assert_array_equal(np.asarray(params["shared"]["w1"][0, :i]),
                                  shared_gate.astype(ml_dtypes.bfloat16))

    _check_fp8_layer(params, routing, tensors, FP8_CONFIG, jnp.asarray(rng.standard_normal((12, d)), jnp.bfloat16))


def _check_fp8_layer(params, routing, tensors, config, x):
    """The loaded fp8 layer on the kernels against the family's float64 block on the
    checkpoint's weights dequantized (value x block scale): ids equal where the scores are
    not tied, outputs within bf16's tolerance (x, h and y are bf16; the weights are exact)."""
    p = f"model.layers.{LAYER}.mlp."
    deq = {name[: -len("_scale_inv")]: _dequant_fp8(tensors, name[: -len(".weight_scale_inv")])
           for name in tensors if name.endswith(".weight_scale_inv")}
    deq.update({k: v for k, v in tensors.items() if not k.endswith("weight") and not k.endswith("_scale_inv")})
    deq[p + "gate.weight"] = tensors[p + "gate.weight"]
    y, got = _run(params, routing, x, "triton")
    want_y, want_ids = family_block("deepseek_v3", deq, to_f64(x), config)
    assert y.dtype == jnp.bfloat16
    logits = to_f64(x) @ _f64(tensors[p + "gate.weight"]).T
    scores = 1.0 / (1.0 + np.exp(-logits)) + _f64(tensors[p + "gate.e_score_correction_bias"])
    top = np.sort(scores, axis=1)[:, ::-1]
    k = config["num_experts_per_tok"]
    untied = np.min(np.abs(np.diff(top[:, : k + 1], axis=1)), axis=1) > 1e-5
    assert untied.mean() > 0.5
    np.testing.assert_array_equal(np.sort(got["topk_ids"][untied], 1), np.sort(want_ids[untied], 1))
    assert rel_err(y, want_y) <= tolerance(jnp.bfloat16)


def test_fp8_checkpoint_errors_are_named(tmp_path, rng):
    d, i, e = 32, 128, 4
    config = {**CONFIGS["deepseek_v3"], "hidden_size": d, "moe_intermediate_size": i, "n_routed_experts": e,
              "n_group": 1, "topk_group": 1, "num_experts_per_tok": 2,
              "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    p = f"model.layers.{LAYER}.mlp."
    tensors = deepseek_fp8_tensors(rng, d, i, e)
    no_scale = {k: v for k, v in tensors.items() if k != p + "experts.2.down_proj.weight_scale_inv"}
    with pytest.raises(CheckpointError, match=r"experts\.2\.down_proj\.weight' has no .*weight_scale_inv"):
        load_layer(write_checkpoint(tmp_path / "a", "deepseek_v3", no_scale, config=config), layer=LAYER)
    wrong = dict(tensors)
    wrong[p + "experts.1.up_proj.weight_scale_inv"] = np.ones((2, 1), np.float32)
    with pytest.raises(CheckpointError, match="weight_scale_inv"):
        load_layer(write_checkpoint(tmp_path / "b", "deepseek_v3", wrong, config=config), layer=LAYER)
    # a shared expert is dequantized tensor by tensor: its size need not be a multiple of 128
    odd = deepseek_fp8_tensors(rng, d, i, e, shared_i=96)
    params, _ = load_layer(write_checkpoint(tmp_path / "s", "deepseek_v3", odd, config=config), layer=LAYER)
    gate, up = (_dequant_fp8(odd, p + f"shared_experts.{n}_proj") for n in ("gate", "up"))
    np.testing.assert_array_equal(np.asarray(params["shared"]["w1"][0]),
                                  np.concatenate([gate, up]).astype(ml_dtypes.bfloat16))
    narrow = deepseek_fp8_tensors(rng, d, 64, e)  # gate and up would share a 128-row scale block
    with pytest.raises(CheckpointError, match="multiple of 128"):
        load_layer(write_checkpoint(tmp_path / "c", "deepseek_v3", narrow,
                                    config={**config, "moe_intermediate_size": 64}), layer=LAYER)
    blocks = {**config, "quantization_config": {"quant_method": "fp8", "weight_block_size": [1, 128]}}
    with pytest.raises(NotImplementedError, match=r"weight_block_size \[1, 128\]"):
        load_layer(write_checkpoint(tmp_path / "d", "deepseek_v3", tensors, config=blocks), layer=LAYER)


def test_gpt_oss_wrong_shapes_are_named(tmp_path, rng):
    tensors = make_tensors(rng, "gpt_oss", np.float32)
    p = f"model.layers.{LAYER}.mlp.experts."
    tensors[p + "down_proj"] = np.swapaxes(tensors[p + "down_proj"], 1, 2).copy()  # [E, D, I]: the wrong way round
    path = write_checkpoint(tmp_path / "bad", "gpt_oss", tensors)
    with pytest.raises(CheckpointError, match=r"experts\.down_proj' is \[8, 32, 16\], expected \[8, 16, 32\]"):
        load_layer(path, layer=LAYER)


@pytest.mark.gpu
class TestDeepseekFp8TritonGPU:
    """DeepSeek-V3's fp8 release loaded at a larger shape (D = 3 blocks, E = 32), on the GPU
    kernels, against the family's float64 block on the dequantized weights."""

    def test_matches_its_model(self, tmp_path, rng):
        d, i, e = 384, 256, 32
        config = {**FP8_CONFIG, "hidden_size": d, "moe_intermediate_size": i, "n_routed_experts": e,
                  "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4}
        tensors = deepseek_fp8_tensors(rng, d, i, e)
        params, routing = load_layer(write_checkpoint(tmp_path / "ds8", "deepseek_v3", tensors, config=config),
                                     layer=LAYER)
        assert params["w1"].scheme == "fp8_block"
        _check_fp8_layer(params, routing, tensors, config, jnp.asarray(rng.standard_normal((200, d)), jnp.bfloat16))


@pytest.mark.gpu
class TestGptOssTritonGPU:
    """gpt-oss's layer loaded from a larger checkpoint, on the GPU kernels, against the oracle."""

    def test_matches_oracle(self, tmp_path, rng):
        e, d, i, m = 32, 256, 128, 300
        p = f"model.layers.{LAYER}.mlp."
        t = {p + "router.weight": rng.standard_normal((e, d)).astype(ml_dtypes.bfloat16),
             p + "router.bias": rng.standard_normal(e).astype(ml_dtypes.bfloat16),
             p + "experts.gate_up_proj": (6.0 * rng.standard_normal((e, d, 2 * i)) / math.sqrt(d)).astype(
                 ml_dtypes.bfloat16),
             p + "experts.gate_up_proj_bias": rng.standard_normal((e, 2 * i)).astype(ml_dtypes.bfloat16),
             p + "experts.down_proj": (rng.standard_normal((e, i, d)) / math.sqrt(i)).astype(ml_dtypes.bfloat16),
             p + "experts.down_proj_bias": rng.standard_normal((e, d)).astype(ml_dtypes.bfloat16)}
        config = {**CONFIGS["gpt_oss"], "hidden_size": d, "intermediate_size": i, "num_local_experts": e}
        params, routing = load_layer(write_checkpoint(tmp_path / "g", "gpt_oss", t, config=config), layer=LAYER)
        x = jnp.asarray(rng.standard_normal((m, d)), jnp.float32).astype(jnp.bfloat16)
        y, got = _run(params, routing, x, "triton")
        want_y, want_ids = oracle.gpt_oss_moe(to_f64(x), *(t[p + n] for n in (
            "router.weight", "router.bias", "experts.gate_up_proj", "experts.gate_up_proj_bias",
            "experts.down_proj", "experts.down_proj_bias")), 4)
        # fp32 logits against float64: ids may differ only where two logits are within fp32 rounding
        logits = to_f64(x) @ np.asarray(t[p + "router.weight"], np.float64).T + np.asarray(t[p + "router.bias"],
                                                                                          np.float64)
        top = np.sort(logits, axis=1)[:, ::-1]
        untied = np.min(np.abs(np.diff(top[:, :5], axis=1)), axis=1) > 1e-4 * np.abs(top[:, 0])
        assert untied.mean() > 0.9
        np.testing.assert_array_equal(got["topk_ids"][untied], want_ids[untied])
        assert rel_err(y, want_y) <= tolerance(jnp.bfloat16)


# --------------------------------------------------------------------------- GPTQ / AWQ 4-bit checkpoints

def int4_linear(rng, t, name, out_f, in_f, method):
    """One 4-bit linear as a GPTQ (v1: zeros stored minus one) or AWQ (GEMM) checkpoint
    stores it; returns its dequantized weight [out, in] in float64."""
    from jaxmoe.quantize import AWQ_ORDER

    q = rng.integers(0, 16, (in_f, out_f))
    z = rng.integers(1, 16, (in_f // 128, out_f))
    s = (rng.uniform(0.5, 1.5, (in_f // 128, out_f)) / (8 * math.sqrt(in_f))).astype(np.float16)
    if method == "gptq":
        t[name + ".qweight"] = pack_words(q, 0)
        t[name + ".qzeros"] = pack_words(z - 1, 1)
        t[name + ".g_idx"] = (np.arange(in_f) // 128).astype(np.int32)
    else:
        t[name + ".qweight"] = pack_words(q, 1, AWQ_ORDER)
        t[name + ".qzeros"] = pack_words(z, 1, AWQ_ORDER)
    t[name + ".scales"] = s
    return ((q - np.repeat(z, 128, axis=0)) * np.repeat(s.astype(np.float64), 128, axis=0)).T


INT4_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": False}


def int4_checkpoint(rng, family, method, d=256, i=128, shared_i=256):
    """One MoE layer (layer LAYER) of a 4-bit checkpoint, fp16 router: ``(tensors, config,
    dequantized float64 weights by the bf16 family's names)``."""
    cfg = {**CONFIGS[family], "hidden_size": d, "num_hidden_layers": 2, "torch_dtype": "float16",
           "quantization_config": dict(INT4_CONFIG, quant_method=method,
                                       **({"version": "gemm", "zero_point": True} if method == "awq" else {}))}
    cfg["intermediate_size" if family == "mixtral" else "moe_intermediate_size"] = i
    if family == "qwen2_moe":
        cfg["shared_expert_intermediate_size"] = shared_i
    e = cfg.get("num_local_experts") or cfg.get("num_experts")
    p = f"model.layers.{LAYER}." + ("block_sparse_moe." if family == "mixtral" else "mlp.")
    names = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    t = {p + "gate.weight": (rng.standard_normal((e, d)) / math.sqrt(d)).astype(np.float16)}
    deq = {p + "gate.weight": t[p + "gate.weight"]}
    mlps = [(f"{p}experts.{j}.", i) for j in range(e)]
    if family == "qwen2_moe":
        mlps.append((p + "shared_expert.", shared_i))
        t[p + "shared_expert_gate.weight"] = rng.standard_normal((1, d)).astype(np.float16)
        deq[p + "shared_expert_gate.weight"] = t[p + "shared_expert_gate.weight"]
    for prefix, inter in mlps:
        for n, (o, k) in zip(names, ((inter, d), (inter, d), (d, inter))):
            deq[prefix + n + ".weight"] = int4_linear(rng, t, prefix + n, o, k, method)
    return t, cfg, deq


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_gptq_and_awq_checkpoints_load_as_int4_zp(tmp_path, rng, family, method):
    """A GPTQ (v1) or AWQ (GEMM) 4-bit checkpoint's experts load as ``int4_zp`` holding the
    stored nibbles, scales and zero points (gate and up stacked on w1's N), without a
    dequantized copy; a quantized shared expert (Qwen2-MoE) is dequantized to the router's
    dtype; the layer on the kernels matches the family's float64 block on the same weights
    dequantized (fp16 activations)."""
    tensors, cfg, deq = int4_checkpoint(rng, family, method)
    params, routing = load_layer(write_checkpoint(tmp_path / method, family, tensors, config=cfg), layer=LAYER)
    w1, w2 = params["w1"], params["w2"]
    e, d, i = params["router"].shape[1], cfg["hidden_size"], 128
    assert w1.scheme == w2.scheme == "int4_zp" and w1.shape == (e, 2 * i, d) and w2.shape == (e, d, i)
    p = f"model.layers.{LAYER}." + ("block_sparse_moe." if family == "mixtral" else "mlp.")
    g, u, dn = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    want1 = np.stack([np.concatenate([deq[f"{p}experts.{j}.{g}.weight"], deq[f"{p}experts.{j}.{u}.weight"]])
                      for j in range(e)])
    want2 = np.stack([deq[f"{p}experts.{j}.{dn}.weight"] for j in range(e)])
    np.testing.assert_allclose(np.asarray(w1.dequantize(), np.float64), want1, rtol=1e-6, atol=0)
    np.testing.assert_allclose(np.asarray(w2.dequantize(), np.float64), want2, rtol=1e-6, atol=0)
    if family == "qwen2_moe":
        assert params["shared"]["w1"].dtype == jnp.float16
        np.testing.assert_array_equal(np.asarray(params["shared"]["w1"][0]),
                                      np.concatenate([deq[p + "shared_expert.gate_proj.weight"],
                                                      deq[p + "shared_expert.up_proj.weight"]]).astype(np.float16))
    x = jnp.asarray(rng.standard_normal((10, d)), jnp.float16)
    y, got = _run(params, routing, x, "triton")
    want_y, want_ids = family_block(family, deq, to_f64(x), cfg)
    assert y.dtype == jnp.float16 and np.isfinite(np.asarray(y, np.float32)).all()
    np.testing.assert_array_equal(np.sort(got["topk_ids"], 1), np.sort(want_ids, 1))
    assert rel_err(y, want_y) <= tolerance(jnp.float16)


def test_int4_checkpoint_errors_are_named(tmp_path, rng):
    tensors, cfg, _ = int4_checkpoint(rng, "qwen3_moe", "gptq")
    p = f"model.layers.{LAYER}.mlp."
    cases = [
        (NotImplementedError, "8-bit weights", {"bits": 8}),
        (NotImplementedError, "group_size 64", {"group_size": 64}),
        (NotImplementedError, "checkpoint_format 'marlin'", {"checkpoint_format": "marlin"}),
        (NotImplementedError, "version 'gemv'", {"quant_method": "awq", "version": "gemv"}),
        (NotImplementedError, "without zero points", {"quant_method": "awq", "zero_point": False}),
    ]
    for n, (err, match, change) in enumerate(cases):
        config = {**cfg, "quantization_config": {**cfg["quantization_config"], **change}}
        with pytest.raises(err, match=match):
            load_layer(write_checkpoint(tmp_path / f"c{n}", "qwen3_moe", tensors, config=config), layer=LAYER)
    act_order = dict(tensors)
    act_order[p + "experts.3.up_proj.g_idx"] = np.roll(tensors[p + "experts.3.up_proj.g_idx"], 1)
    with pytest.raises(NotImplementedError, match="act-order"):
        load_layer(write_checkpoint(tmp_path / "g", "qwen3_moe", act_order, config=cfg), layer=LAYER)
    wrong = dict(tensors)
    wrong[p + "experts.5.down_proj.scales"] = tensors[p + "experts.5.down_proj.scales"][:, :8]
    with pytest.raises(CheckpointError, match=r"experts\.5\.down_proj\.scales"):
        load_layer(write_checkpoint(tmp_path / "w", "qwen3_moe", wrong, config=cfg), layer=LAYER)
    missing = {k: v for k, v in tensors.items() if k != p + "experts.0.gate_proj.qzeros"}
    with pytest.raises(CheckpointError, match=r"experts\.0\.gate_proj\.qzeros"):
        load_layer(write_checkpoint(tmp_path / "m", "qwen3_moe", missing, config=cfg), layer=LAYER)
