"""Expert, tensor and data parallelism (jaxmoe.parallel, moe_layer(mesh=...)).

The multi-device checks run once, in a subprocess with 8 host CPU devices
(tests/parallel_worker.py; this process keeps its one device), and each case is reported
as a test of its own. The communication model and a 1-device mesh run here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import jaxmoe
import parallel_worker
from jaxmoe.parallel import choose_schedule, communication_bytes

# One pytest-xdist worker runs this module: the 8-device worker process starts once.
pytestmark = pytest.mark.xdist_group("parallel")

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parallel_worker.py")


# Scoped to the whole pytest run: pytest tears a module fixture down whenever its worker runs
# another module's test in between, and the 8-device worker would run again.
@pytest.fixture(scope="session")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel") / "results.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, WORKER, str(out)], env=env, capture_output=True, text=True, timeout=600)
    if not out.exists():
        pytest.fail(f"the 8-device worker wrote no results (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                    f"{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", list(parallel_worker.CASES))
def test_multi_device(results, name):
    """One of tests/parallel_worker.py's cases on 8 CPU devices (its docstring says what)."""
    assert name in results, f"{name} did not run (the worker stopped early)"
    r = results[name]
    assert r["ok"], r["detail"]


def test_one_device_mesh_reference():
    params = jaxmoe.init_moe_params(jax.random.key(0), hidden=16, intermediate=8, experts=4, dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(1), (5, 16), jnp.float32)
    mesh = Mesh(np.array(jax.devices()[:1]), ("ep",))
    want = jaxmoe.moe_layer(params, x, top_k=2, implementation="reference")
    for schedule in ("allgather", "all_to_all", None):
        got = jax.jit(lambda p, x: jaxmoe.moe_layer(p, x, top_k=2, mesh=mesh, expert_axis="ep", schedule=schedule,
                                                   implementation="reference"))(params, x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", ["allgather", "all_to_all"])
def test_gpu_one_device_mesh_kernels(schedule):
    """A 1-device mesh through the real Triton kernels inside shard_map."""
    params = jaxmoe.init_moe_params(jax.random.key(0), hidden=64, intermediate=32, experts=8, dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(1), (16, 64), jnp.float32)
    mesh = Mesh(np.array(jax.devices()[:1]), ("ep",))
    want = jaxmoe.moe_layer(params, x, top_k=2, implementation="reference")
    got = jax.jit(lambda p, x: jaxmoe.moe_layer(p, x, top_k=2, mesh=mesh, expert_axis="ep", schedule=schedule,
                                               implementation="triton"))(params, x)
    assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", ["allgather", "all_to_all"])
def test_gpu_one_device_mesh_kernels_grad_bf16(schedule):
    """Gradients through the Triton forward and backward kernels inside shard_map, on a 1 x 1
    (expert x tensor) mesh, bf16, with shared experts: equal to the kernels without a mesh
    (the same kernels on the same rows, so to bf16 rounding of the output) and close to the
    fp32 reference's gradients (bf16 tolerance)."""
    params = jaxmoe.init_moe_params(jax.random.key(2), hidden=128, intermediate=64, experts=8, dtype=jnp.bfloat16)
    params["shared"] = {"w1": (jax.random.normal(jax.random.key(3), (1, 64, 128)) / 12).astype(jnp.bfloat16),
                        "w2": (jax.random.normal(jax.random.key(4), (1, 128, 32)) / 6).astype(jnp.bfloat16)}
    x = jax.random.normal(jax.random.key(5), (40, 128), jnp.float32).astype(jnp.bfloat16)
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("ep", "tp"))

    def grads(implementation, **kw):
        def loss(p, x):
            y = jaxmoe.moe_layer(p, x, top_k=2, implementation=implementation, **kw).astype(jnp.float32)
            return jnp.sum(jnp.sin(y))
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    got = grads("triton", mesh=mesh, expert_axis="ep", tensor_axis="tp", schedule=schedule)
    plain = grads("triton")
    f32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    ref = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(jaxmoe.moe_layer(p, x, top_k=2, implementation="reference"))),
                           argnums=(0, 1)))(f32, x.astype(jnp.float32))
    for (path, g), p, r in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(plain),
                               jax.tree.leaves(ref)):
        g = g.reshape(p.shape)
        assert bool(jnp.isfinite(g.astype(jnp.float32)).all()), path
        err_plain = float(jnp.linalg.norm((g - p).astype(jnp.float32)) / jnp.linalg.norm(p.astype(jnp.float32)))
        err_ref = float(jnp.linalg.norm(g.astype(jnp.float32) - r.reshape(g.shape))
                        / jnp.linalg.norm(r.astype(jnp.float32)))
        assert err_plain <= 1e-2 and err_ref <= 3e-2, (jax.tree_util.keystr(path), err_plain, err_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme,act_quant", [("int4", None), ("fp8", "fp8"), ("fp8_block", "fp8")])
def test_gpu_one_device_mesh_quantized_kernels(scheme, act_quant):
    """Quantized weights through the real kernels inside shard_map, on a 1 x 1 (expert x
    tensor) mesh, as given and placed by shard_params (the split view of w1): equal to the
    kernels without a mesh."""
    params = jaxmoe.init_moe_params(jax.random.key(6), hidden=256, intermediate=256, experts=8, dtype=jnp.bfloat16)
    q = {**params, "w1": jaxmoe.quantize_weights(params["w1"], scheme),
         "w2": jaxmoe.quantize_weights(params["w2"], scheme)}
    x = jax.random.normal(jax.random.key(7), (24, 256), jnp.float32).astype(jnp.bfloat16)
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("ep", "tp"))
    want = jax.jit(lambda p, x: jaxmoe.moe_layer(p, x, top_k=2, act_quant=act_quant, implementation="triton"))(q, x)
    placed = jaxmoe.parallel.shard_params(q, mesh, expert_axis="ep", tensor_axis="tp")
    for weights in (q, placed):
        got = jax.jit(lambda p, x: jaxmoe.moe_layer(p, x, top_k=2, act_quant=act_quant, mesh=mesh, expert_axis="ep",
                                                   tensor_axis="tp", implementation="triton"))(weights, x)
        assert bool(jnp.isfinite(got.astype(jnp.float32)).all())
        assert float(jnp.linalg.norm((got - want).astype(jnp.float32))
                     / jnp.linalg.norm(want.astype(jnp.float32))) <= 1e-2


def test_communication_model():
    """Mixtral-like: 4096 tokens, D=4096, bf16, over 8 expert devices: T = 512 rows each."""
    c = communication_bytes(4096, 4096, 2, 8, ep=8, dtype=jnp.bfloat16)
    row = 4096 * 2
    assert c["allgather"].dispatch == c["allgather"].combine == 7 * 512 * row
    assert c["all_to_all"].dispatch == 7 * (512 * (row + 16) + 4)
    assert c["all_to_all"].combine == 7 * 512 * row
    assert c["allgather"].buffer_rows == c["all_to_all"].buffer_rows == 8 * 512
    # ragged: a token reaches a given other device with p = 1 - C(7, 2) / C(8, 2) = 1/4
    assert c["all_to_all_ragged"].combine == round(7 * 512 * 0.25 * row)
    assert c["allgather"].tensor == 0
    t = communication_bytes(4096, 4096, 2, 8, ep=4, tp=2, dp=2, dtype=jnp.float32)
    assert t["allgather"].tensor == t["all_to_all"].tensor == 2 * 1 * 512 * 4096 * 4 // 2
    assert communication_bytes(64, 8, 2, 8, ep=1)["all_to_all"].total == 0


def test_choose_schedule():
    # The dense all_to_all moves the allgather's rows plus their ids and weights: allgather wins.
    for ep in (1, 2, 8):
        assert choose_schedule(1024, 512, 8, 256, ep=ep) == "allgather"
    with pytest.raises(ValueError, match="divide"):
        communication_bytes(64, 8, 2, 6, ep=4)
    with pytest.raises(ValueError, match="tokens"):
        communication_bytes(0, 8, 2, 8, ep=1)


def test_comm_model_bench_prints_the_documented_bytes(tmp_path):
    """bench/comm_model.py prints communication_bytes per schedule for presets: the rows of
    docs/parallel.md's table (bf16, 8192 tokens), and writes them as JSON."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *sys.path]), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(root / "bench" / "comm_model.py"), "--model", "mixtral-8x7b",
                          "--model", "deepseek-v3", "--m", "8192", "--ep", "8", "--out", str(tmp_path / "c.json")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    table = {(r["model"], r["ep"]): r for r in json.loads((tmp_path / "c.json").read_text())}
    mix, ds = table[("mixtral-8x7b", 8)], table[("deepseek-v3", 8)]
    assert [round(mix[f"{c}_mib"], 1) for c in ("allgather", "all_to_all", "all_to_all_ragged")] == [112.0, 112.1, 28.0]
    assert [round(ds[f"{c}_mib"], 1) for c in ("allgather", "all_to_all", "all_to_all_ragged")] == [196.0, 196.4, 130.0]
    assert mix["chosen"] == ds["chosen"] == "allgather"
    assert "mixtral-8x7b       8192    8              112.0" in out.stdout
    bad = subprocess.run([sys.executable, str(root / "bench" / "comm_model.py"), "--model", "mixtral-8x7b",
                          "--m", "8", "--ep", "3"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode != 0 and "does not divide" in bad.stderr
