"""The bench's PyTorch peer (``jaxmoe/tools/torch_peer.py``): torch is not a dependency, so
the tests of its numbers run where torch is importable (the GPU machine has it; CI does
not, and reports them skipped); what a user without torch sees is tested everywhere."""

from __future__ import annotations

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe import reference
from jaxmoe.__main__ import main
from jaxmoe.layer import init_moe_params, moe_layer
from jaxmoe.models import PRESETS
from jaxmoe.quantize import quantize_activations, quantize_weights
from jaxmoe.tools import bench, torch_peer

HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed (the peer is optional)")
CPU_ONLY = pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU run of the bench")
ROUTED = [n for n in PRESETS if n != "tiny"]  # every routing mode the presets use


def _params(name: str, rng: np.random.Generator, d: int = 128, i: int = 256):
    p = PRESETS[name]
    params = init_moe_params(jax.random.key(int(rng.integers(1 << 30))), hidden=d, intermediate=i,
                             experts=p.experts, dtype=jnp.bfloat16)
    return params, p.routing_kwargs(jax.random.key(int(rng.integers(1 << 30))))


def _emulated_scaled_grouped_mm(a, b_t, scale_a, scale_b, offs, out_dtype):
    """torch._scaled_grouped_mm's contract (2-D A by 3-D B, row-wise scales), per group in fp32."""
    import torch

    out = torch.full((a.shape[0], b_t.shape[2]), float("nan"), dtype=out_dtype)  # unwritten rows show
    start = 0
    for g, end in enumerate(offs.tolist()):
        out[start:end] = ((a[start:end].float() @ b_t[g].float()) * scale_a[start:end, None]
                          * scale_b[g][None, :]).to(out_dtype)
        start = end
    return out


@pytest.mark.skipif(HAS_TORCH, reason="torch is installed here")
def test_without_torch_the_peer_says_not_installed(tmp_path):
    assert torch_peer.unavailable("gpu") == "not installed"
    assert main(["bench", "--model", "tiny", "--m", "2", "--reps", "1", "--impl", "torch",
                 "--ceilings", "table", "--out", str(tmp_path / "b")]) == 0
    (row,) = json.loads((tmp_path / "b.json").read_text())
    assert row["impl"] == "torch" and row["status"] == "not installed" and row["time_ms"] is None


def test_torch_in_train_mode_is_refused(capsys):
    assert main(["bench", "--mode", "train", "--model", "tiny", "--impl", "jaxmoe,torch",
                 "--out", "unused"]) == 2
    assert "forward only" in capsys.readouterr().err


def test_default_peers_leave_torch_out_of_train_mode():
    assert torch_peer.NAME not in bench.default_implementations("train")
    assert (torch_peer.NAME in bench.default_implementations("forward")) == HAS_TORCH


def test_unavailable_names_the_schemes_without_a_torch_kernel():
    if not HAS_TORCH:
        pytest.skip("torch is not installed (the peer is optional)")
    for quant, act in (("fp8_block", "fp8"), ("int8", "int8"), ("int4", None), ("fp8", None)):
        assert "no grouped GEMM" in torch_peer.unavailable("gpu" if jax.default_backend() != "cpu" else "cpu",
                                                             quant, act)


@needs_torch
@pytest.mark.parametrize("name", ROUTED)
def test_routing_matches_jaxmoe(name, rng):
    """The peer routes as jaxmoe.route does: the same ids (random logits: no ties) and weights."""
    import torch

    _, routing = _params(name, rng)
    logits = jnp.asarray(rng.standard_normal((64, PRESETS[name].experts)), jnp.float32)
    w_ref, ids_ref = reference.route(logits, **routing)
    r = dict(routing)
    if r.get("correction_bias") is not None:
        r["correction_bias"] = torch.from_numpy(np.array(r["correction_bias"]))
    w, ids = torch_peer.route(torch.from_numpy(np.array(logits)), **r)
    np.testing.assert_array_equal(ids.numpy(), np.asarray(ids_ref))
    np.testing.assert_allclose(w.numpy(), np.asarray(w_ref), rtol=2e-6, atol=0)


@needs_torch
def test_rounded_rows_follow_jaxmoe_rounding(rng):
    """Per-token fp8 rounding as jaxmoe rounds (quantize_activations): scale = amax / 448
    exactly, codes = x * (448 / amax) rounded to nearest even e4m3, bit for bit (the data
    hold exact ties: bf16 x times 448 / amax often lands on one); rows of zeros get scale 0
    (no division by zero)."""
    import ml_dtypes
    import torch

    x = rng.standard_normal((33, 200)).astype(np.float32) * rng.uniform(0.01, 100, (33, 1)).astype(np.float32)
    x[5] = 0.0
    xj = jnp.asarray(x, jnp.bfloat16)
    q, scale = torch_peer.quantize_rows(torch_peer.to_torch(xj), torch.float8_e4m3fn)
    xf = np.asarray(xj.astype(jnp.float32))
    amax = np.abs(xf).max(axis=1)
    np.testing.assert_array_equal(scale.numpy(), amax / np.float32(448))
    inv = np.where(amax > 0, np.float32(448) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    y = np.clip(xf * inv[:, None], -448, 448)
    ref = y.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(q.float().numpy(), ref)
    assert float(scale[5]) == 0.0 and not q[5].float().any()
    # and jaxmoe's own rounding makes the same codes (its scale may differ by an fp32 ulp)
    theirs = np.asarray(quantize_activations(xj, "fp8")) / np.where(amax > 0, amax / np.float32(448), 1)[:, None]
    np.testing.assert_allclose(theirs, ref, rtol=1e-6, atol=0)


@needs_torch
@pytest.mark.parametrize("name", ["tiny", *ROUTED])
@pytest.mark.parametrize("m", [1, 37])
def test_layer_matches_jaxmoe_reference(name, m, rng):
    """bf16 weights through torch._grouped_mm (on the CPU here) against moe_layer's
    reference, at the peer's tolerance; a wrong expert order breaks it."""
    params, routing = _params(name, rng)
    x = jnp.asarray(rng.standard_normal((m, 128)), jnp.bfloat16)
    ref = np.asarray(moe_layer(params, x, implementation="reference", **routing), np.float32)
    if jax.default_backend() != "cpu":
        params, x = jax.device_put((params, x), jax.devices("cpu")[0])  # the CPU check of the math
    layer = torch_peer.TorchLayer(params, routing)
    err = torch_peer.relative_error(layer(torch_peer.to_torch(x)), ref)
    assert err <= torch_peer.TOLERANCE["bf16"] / 2, err

    import torch

    def shifted(a, b_t, offs):  # every row multiplied by the next expert's weights
        return torch._grouped_mm(a, torch.roll(b_t, 1, dims=0), offs=offs)

    wrong = torch_peer.TorchLayer(params, routing, grouped_mm=shifted)
    assert torch_peer.relative_error(wrong(torch_peer.to_torch(x)), ref) > torch_peer.TOLERANCE["bf16"]


@needs_torch
@pytest.mark.parametrize("scheme", torch_peer.FP8_SCHEMES)
@pytest.mark.parametrize("name", ["mixtral-8x7b", "deepseek-v3", "qwen3-30b-a3b"])
def test_fp8_layer_matches_jaxmoe_reference(scheme, name, rng):
    """The fp8 peer's data flow (the same e4m3 weights and scales, activations rounded per
    token before each GEMM) against moe_layer's reference with act_quant="fp8", with an
    fp32 stand-in for torch._scaled_grouped_mm (which has no CPU kernel)."""
    params, routing = _params(name, rng)
    params = {**params, "w1": quantize_weights(params["w1"], scheme), "w2": quantize_weights(params["w2"], scheme)}
    x = jnp.asarray(rng.standard_normal((40, 128)), jnp.bfloat16)
    ref = np.asarray(moe_layer(params, x, implementation="reference", act_quant="fp8", **routing), np.float32)
    if jax.default_backend() != "cpu":
        params, x = jax.device_put((params, x), jax.devices("cpu")[0])
    layer = torch_peer.TorchLayer(params, routing, scaled_grouped_mm=_emulated_scaled_grouped_mm)
    err = torch_peer.relative_error(layer(torch_peer.to_torch(x)), ref)
    assert err <= torch_peer.TOLERANCE["fp8"] / 2, err


@needs_torch
def test_time_chains_times_and_refuses_non_finite_data(rng):
    import torch

    xs = torch.from_numpy(rng.standard_normal((4, 8, 16)).astype(np.float32))
    t, overhead, out, how = torch_peer.time_chains(lambda x: torch.tanh(x) * 0.5, xs, reps=3, short=2)
    assert t > 0 and overhead >= 0 and how == "eager" and bool(torch.isfinite(out).all())
    with pytest.raises(bench.NonFiniteError):
        torch_peer.time_chains(lambda x: x * float("inf"), xs, reps=1, short=2)
    with pytest.raises(ValueError, match="more than 2"):
        torch_peer.time_chains(torch.tanh, xs[:2], reps=1, short=2)


@needs_torch
@CPU_ONLY
def test_bench_times_the_torch_peer_beside_jaxmoe(tmp_path, capsys):
    """One CPU cell: the torch row is timed and checked against jaxmoe's output; its
    quantized row says why it cannot run here."""
    prefix = str(tmp_path / "b")
    assert main(["bench", "--model", "tiny", "--m", "4", "--reps", "2", "--impl", "jaxmoe,torch",
                 "--quant", "fp8", "--act-quant", "fp8", "--ceilings", "table", "--out", prefix]) == 0
    rows = {r["impl"]: r for r in json.loads((tmp_path / "b.json").read_text())}
    assert rows["torch"]["status"] == "ok" and rows["torch"]["time_ms"] > 0
    assert "torch" in rows["jaxmoe"]["speedup"]
    assert rows["torch:fp8+afp8"]["status"] == "torch's _scaled_grouped_mm has no CPU kernel"
    assert "relative error against jaxmoe" in capsys.readouterr().err


@pytest.mark.gpu
@needs_torch
@pytest.mark.parametrize("m", [1, 256])
def test_torch_kernels_on_the_gpu_match_jaxmoe(m, rng):
    """torch's own grouped GEMMs on the card (bf16 and row-wise fp8) against jaxmoe's
    kernels, on Mixtral-8x7B's routing at a quarter of its width; timed as CUDA graphs."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("torch's fp8 grouped GEMM needs an sm_90 GPU that torch sees")
    params, routing = _params("mixtral-8x7b", rng, d=1024, i=3584)
    x = jnp.asarray(rng.standard_normal((m, 1024)), jnp.bfloat16)
    for quant in (None, "fp8"):
        p = params if quant is None else {**params, "w1": quantize_weights(params["w1"], quant),
                                          "w2": quantize_weights(params["w2"], quant)}
        ours = np.asarray(moe_layer(p, x, implementation="triton", act_quant=quant, **routing), np.float32)
        layer = torch_peer.TorchLayer(p, routing)
        with torch.no_grad():
            err = torch_peer.relative_error(layer(torch_peer.to_torch(x)), ours)
        assert err <= torch_peer.TOLERANCE["bf16" if quant is None else "fp8"], (quant, err)
        xs = torch_peer.to_torch(jnp.asarray(rng.standard_normal((4, m, 1024)) * 0.1, jnp.bfloat16))
        t, _, out, how = torch_peer.time_chains(layer, xs, reps=3, short=2)
        assert t > 0 and how == "CUDA graph" and bool(torch.isfinite(out).all()), (quant, how)
