"""Shared test helpers: a fresh, reproducible random generator per test; norm-wise errors;
visible skipping of GPU-only tests on a CPU."""

from __future__ import annotations

import math
import os
import tempfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Tolerances of the norm-wise relative error ||out - ref|| / ||ref||, by output dtype.
TOLERANCE = {"bfloat16": 1e-2, "float16": 1e-2, "float32": 1e-4}


def pytest_configure(config):
    # Tuned tables in the user's config directory (where `python -m jaxmoe tune` writes) must
    # neither change what the tests run nor be written by them.
    os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="jaxmoe-tests-config-")


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() != "cpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA/ROCm GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test's id: fresh data per test, the same on every run."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def to_f64(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.float32), dtype=np.float64)


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64 (0 when both are 0)."""
    out, ref = to_f64(out), to_f64(ref)
    denom = np.linalg.norm(ref)
    num = np.linalg.norm(out - ref)
    return float(num / denom) if denom else float(num)


def tolerance(dtype) -> float:
    return TOLERANCE[jnp.dtype(dtype).name]


def randn(rng: np.random.Generator, shape, dtype=jnp.float32, scale: float = 1.0) -> jax.Array:
    """Standard normal values times ``scale``, drawn from ``rng`` (float32 on the host), or for
    arrays of real-model size (DeepSeek-V3's w1 holds 7.5e9 values, 60 GB as numpy's float64)
    drawn on the default device from a key that ``rng`` gives, so that no host copy is made."""
    if math.prod(shape) >= 2**26:
        key = jax.random.key(int(rng.integers(2**31)))
        return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return jnp.asarray(np.multiply(rng.standard_normal(shape, dtype=np.float32), np.float32(scale)),
                       jnp.float32).astype(dtype)


def random_ids(rng: np.random.Generator, m: int, k: int, experts) -> jax.Array:
    """``[m, k]`` int32 ids, distinct within a row, drawn from ``experts`` (an int E or a list)."""
    pool = np.arange(experts) if isinstance(experts, int) else np.asarray(experts)
    rows = [rng.choice(pool, size=k, replace=False) for _ in range(m)]
    return jnp.asarray(np.array(rows, np.int64).reshape(m, k), jnp.int32)


def moe_inputs(rng, m, d, i, e, k, dtype, experts=None):
    """Random (x, w1, w2, topk_weights, topk_ids) for fused_moe, weights scaled like a real layer."""
    x = randn(rng, (m, d), dtype)
    w1 = randn(rng, (e, 2 * i, d), dtype, scale=d**-0.5)
    w2 = randn(rng, (e, d, i), dtype, scale=i**-0.5)
    topk_weights = jnp.asarray(rng.uniform(0.1, 1.0, (m, k)), jnp.float32)
    topk_ids = random_ids(rng, m, k, e if experts is None else experts)
    return x, w1, w2, topk_weights, topk_ids


@pytest.fixture
def int4_splits(monkeypatch):
    """``JAXMOE_INT4_SPLIT=1`` for the test; yields what each GEMM's plan decided, as
    (weight scheme, K, BLOCK_K, split), and afterwards checks that every int4 / int4_zp
    weight-only GEMM over whole K tiles (of at least 32) read its A split."""
    from jaxmoe.ops.gemm import config as _config

    monkeypatch.setenv(_config.INT4_SPLIT_ENV, "1")
    seen, plan = [], _config.int4_split

    def recording(**kw):
        seen.append((kw["w_scheme"], kw["k"], kw["block_k"], plan(**kw)))
        return seen[-1][-1]

    monkeypatch.setattr(_config, "int4_split", recording)
    yield seen
    assert all(split for scheme, k, block_k, split in seen
               if scheme in ("int4", "int4_zp") and k % block_k == 0 and block_k >= 32), seen


@pytest.fixture
def tma_views(monkeypatch):
    """``JAXMOE_TMA=1`` for the test; yields the B views its GEMMs were planned with, as
    (A's bytes per element, weight scheme, view), and afterwards checks that every GEMM on
    16-bit activations against weights TMA can read as stored read B through a tensor
    descriptor (fp32 activations and 4-bit weights keep pointer loads)."""
    from jaxmoe.ops.gemm import config as _config

    monkeypatch.setenv(_config.TMA_ENV, "1")
    views, plan = [], _config.b_descriptor_view

    def recording(**kw):
        views.append((kw["a_itemsize"], kw["w_scheme"], plan(**kw)))
        return views[-1][-1]

    monkeypatch.setattr(_config, "b_descriptor_view", recording)
    yield views
    assert all(view != "none" for size, scheme, view in views if size == 2 and scheme in _config.TMA_SCHEMES), views


def pack_words(nib: np.ndarray, axis: int, order=tuple(range(8))) -> np.ndarray:
    """4-bit values -> int32 words along ``axis``, slot j (bits 4j..4j+3) holding element
    8c + order[j]: AutoGPTQ's qweight along K, its qzeros and AutoAWQ's along N (in AWQ's
    order). C-ordered, as safetensors writes arrays."""
    nib = np.moveaxis(nib.astype(np.uint32), axis, -1)
    groups = nib.reshape(*nib.shape[:-1], -1, 8)
    words = np.zeros(groups.shape[:-1], np.uint32)
    for j in range(8):
        words |= groups[..., order[j]] << (4 * j)
    return np.ascontiguousarray(np.moveaxis(words.view(np.int32), -1, axis))
