"""The shape of every op's tests.

One base class per op holds its case tables and its test methods, and calls the op with
``implementation=self.implementation``; a subclass per implementation runs the whole suite:

    class TestRouteReference(RouteTests): implementation = "reference"
    class TestRouteTritonInterpreter(RouteTests): implementation = "triton"   # CPU: Triton's interpreter

    @pytest.mark.gpu
    class TestRouteTritonGPU(RouteTests):
        implementation, gpu = "triton", True
        TOPK_ROWS = [...]                                                       # larger tables

A new backend or scheme gets every case by adding one such class. The base classes have
no ``Test`` prefix, so pytest collects only the subclasses.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe import backends

BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


def cases(table: str, argnames: str):
    """Parametrize a test method by the class attribute ``table``: a dict of id -> values
    (a tuple for several ``argnames``), so a subclass can replace the cases."""

    def mark(fn):
        fn.case_table = (table, argnames)
        return fn

    return mark


class OpTests:
    """Base of an op's suite: ``implementation`` names what the op runs, ``gpu`` whether the
    class needs a GPU (its larger tables are sized for one)."""

    implementation: Any = None
    gpu = False

    def pytest_generate_tests(self, metafunc):
        spec = getattr(metafunc.function, "case_table", None)
        if spec is None:
            return
        table, argnames = spec
        values = getattr(metafunc.cls, table)
        # an empty table would turn the test into a skip: a class must hold cases for each test
        assert values, f"{metafunc.cls.__name__}.{table} is empty"
        metafunc.parametrize(argnames, list(values.values()), ids=[str(k) for k in values])

    @property
    def impl(self) -> dict[str, Any]:
        return {"implementation": self.implementation}

    def jit(self, fn, *args):
        """``fn(*args)`` under jax.jit, traced with poisoned kernel outputs (an element no
        kernel writes comes back NaN), fetched to numpy."""
        with backends.poisoned_outputs():
            return jax.device_get(jax.jit(fn)(*args))


def logits(rng: np.random.Generator, m: int, e: int, dtype=F32, scale: float = 2.0) -> jax.Array:
    return jnp.asarray(scale * rng.standard_normal((m, e)), F32).astype(dtype)


def bias(rng: np.random.Generator, e: int, dtype=F32) -> jax.Array:
    return jnp.asarray(0.1 * rng.standard_normal(e), F32).astype(dtype)


def with_invalid_ids(topk_ids, num_experts):
    """Three ids outside [0, E): negative, past E, and the most negative int32."""
    ids = np.array(topk_ids)
    if ids.shape[0] > 2:
        ids[0, 0] = -1
        ids[1, -1] = num_experts + 3
        ids[2, 0] = -(2**31)
    return jnp.asarray(ids)


def ids_with_counts(rng, counts):
    """[sum(counts), 1] ids: expert e chosen by counts[e] rows, rows shuffled."""
    ids = np.repeat(np.arange(len(counts)), counts)
    return jnp.asarray(rng.permutation(ids).reshape(-1, 1), jnp.int32)
