"""Each patch in ``jaxmoe._compat`` still answers a defect that exists, on the versions installed.

When a new Triton or jax-triton fixes a defect (or changes what a patch replaces), a test
here fails: the patch is then unnecessary or wrong, and goes or is rewritten.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxmoe._compat import triton_interpreter

triton = pytest.importorskip("triton")


def _handles():
    import triton.language as tl
    from triton.runtime import interpreter

    return tl, interpreter, type(interpreter.interpreter_builder)


def test_installed_triton_is_in_the_tested_range():
    major, minor = (int(p) for p in triton.__version__.split(".")[:2])
    assert triton_interpreter.TESTED[0] <= (major, minor) <= triton_interpreter.TESTED[1], (
        f"Triton {triton.__version__}: check the interpreter defects below and widen TESTED")


def test_interpreter_still_multiplies_bf16_bit_patterns():
    """Unpatched, a bf16 dot multiplies the raw uint16 patterns; patched, the values."""
    tl, interpreter, builder = _handles()
    a = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    bits = triton_interpreter.round_f32_to_bf16_bits(a)
    ha, hb = interpreter.TensorHandle(bits, tl.bfloat16), interpreter.TensorHandle(bits.copy(), tl.bfloat16)
    acc = interpreter.TensorHandle(np.zeros((2, 2), np.float32), tl.float32)
    raw = builder.create_dot(interpreter.interpreter_builder, ha, hb, acc, None, 0).data
    assert not np.allclose(raw, a @ a), "the interpreter's bf16 dot is right now: drop the widening patch"
    with triton_interpreter.patches():
        fixed = builder.create_dot(interpreter.interpreter_builder, ha, hb, acc, None, 0).data
    np.testing.assert_allclose(fixed, a @ a)


def test_interpreter_still_truncates_fp32_to_bf16():
    """Unpatched, fp32 -> bf16 truncates; patched, it rounds to nearest even as a GPU does."""
    tl, interpreter, builder = _handles()
    x = np.array([1.0 + 0.75 * 2.0**-7, -(1.0 + 0.75 * 2.0**-7), 1.0 + 0.5 * 2.0**-7, np.nan, 3.0e38],
                 np.float32)
    src = interpreter.TensorHandle(x, tl.float32)
    truncated = triton_interpreter.bf16_bits_to_f32(builder.cast_impl(interpreter.interpreter_builder, src,
                                                                      tl.bfloat16).data)
    assert truncated[0] == 1.0, "the interpreter rounds fp32 -> bf16 now: drop the rounding patch"
    with triton_interpreter.patches():
        got = builder.cast_impl(interpreter.interpreter_builder, src, tl.bfloat16).data
    want = np.asarray(jax.numpy.asarray(x).astype(jax.numpy.bfloat16).view(np.uint16))
    np.testing.assert_array_equal(got[:3], want[:3])  # nearest, ties to even
    assert np.isnan(triton_interpreter.bf16_bits_to_f32(got)[3])
    np.testing.assert_array_equal(got[4], want[4])


def test_interpreter_still_mis_rounds_fp32_to_fp8():
    """Unpatched, fp32 -> e4m3fn loses the mantissa carry (15.9 rounds to 8, not 16) and
    rounds ties up; patched, it rounds to nearest even and saturates at 448 as a GPU does."""
    import ml_dtypes

    tl, interpreter, builder = _handles()
    x = np.array([15.9, -15.9, 1.0625, 1.1875, 500.0, np.nan, 0.3], np.float32)
    src = interpreter.TensorHandle(x, tl.float32)
    raw = builder.create_fp_to_fp(interpreter.interpreter_builder, src, tl.float8e4nv, None).data
    raw = raw.view(np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert raw[0] != 16.0, "the interpreter rounds fp32 -> fp8 right now: drop the fp8 cast patch"
    with triton_interpreter.patches():
        got = builder.create_fp_to_fp(interpreter.interpreter_builder, src, tl.float8e4nv, None).data
    got = triton_interpreter.e4m3fn_bits_to_f32(got)
    np.testing.assert_array_equal(got[[0, 1, 2, 3, 6]], [16.0, -16.0, 1.0, 1.25, 0.3125])  # nearest, ties even
    assert got[4] == 448.0 and np.isnan(got[5])


def test_interpreter_still_lacks_dot_scaled():
    """Unpatched, the interpreter has no ``create_dot_scaled``; patched, a bf16 lhs times a
    K-packed e2m1 rhs with e8m0 scales is each value times its scale rounded to bf16 (a
    zero exponent reads as a zero scale, 255 as NaN, as Triton's sm_90 lowering does), then
    an fp32 product."""
    tl, interpreter, builder = _handles()
    from triton._C.libtriton import ir

    assert not hasattr(builder, "create_dot_scaled"), "the interpreter has tl.dot_scaled now: drop that patch"
    rng = np.random.default_rng(0)
    m, k, n = 3, 64, 4
    lhs = rng.standard_normal((m, k)).astype(np.float32)
    packed = rng.integers(0, 256, (k // 2, n)).astype(np.uint8)
    e = rng.integers(118, 136, (n, k // 32)).astype(np.uint8)
    e[0, 0], e[1, 1] = 0, 255
    bits = triton_interpreter.round_f32_to_bf16_bits(lhs)
    args = (interpreter.TensorHandle(bits, tl.bfloat16), None, ir.ScaleDotElemTypeTY.BF16,
            interpreter.TensorHandle(packed, tl.uint8), interpreter.TensorHandle(e, tl.uint8),
            ir.ScaleDotElemTypeTY.E2M1, False, True, True,
            interpreter.TensorHandle(np.ones((m, n), np.float32), tl.float32))
    with triton_interpreter.patches():
        got = builder.create_dot_scaled(interpreter.interpreter_builder, *args).data
        with pytest.raises(NotImplementedError):
            builder.create_dot_scaled(interpreter.interpreter_builder, *args[:6], False, True, False, args[9])
    codes = np.stack([packed & 0xF, packed >> 4], axis=1).reshape(k, n)
    scale = np.where(e == 0, 0.0, 2.0 ** (e.astype(np.float64) - 127)).T.repeat(32, axis=0)
    w = triton_interpreter.E2M1_VALUES[codes] * scale  # exact in bf16: two significant bits
    want = triton_interpreter.bf16_bits_to_f32(bits).astype(np.float64) @ w + 1.0
    assert np.isnan(got[:, 1]).all() and not np.isnan(np.delete(got, 1, axis=1)).any()
    np.testing.assert_allclose(np.delete(got, 1, axis=1), np.delete(want, 1, axis=1), rtol=1e-5)
    assert not hasattr(builder, "create_dot_scaled")  # undone


def test_patches_are_undone():
    tl, interpreter, builder = _handles()
    before = (builder.create_dot, builder.cast_impl, dict(vars(tl)))
    with triton_interpreter.patches():
        assert builder.cast_impl is not before[1]
    assert (builder.create_dot, builder.cast_impl) == before[:2]
    assert all(vars(tl).get(k) is v for k, v in before[2].items())


@pytest.mark.gpu
def test_gpu_jax_triton_payload_patch_still_finds_its_internals():
    """On jax-triton 0.3.x the payload patch must find what it replaces (else it silently
    does nothing and every launch pays the large payload again)."""
    import jax_triton

    from jaxmoe._compat import jax_triton as compat

    if not jax_triton.__version__.startswith(compat.PATCHED_VERSIONS):
        assert not compat.slim_payload_applies(jax_triton)
        pytest.skip(f"jax-triton {jax_triton.__version__} builds another payload; the patch is not applied")
    assert compat.slim_payload_applies(jax_triton)


class _FakeLib:
    """The two names of jax-triton 0.3.x's ``triton_lib`` the patches rewrite: a compile
    that fills Triton's metadata dict through the backend, and jaxlib's kernel constructor
    (``accepts_scratch``: a jaxlib whose ``TritonKernel`` takes the scratch arguments)."""

    def __init__(self, accepts_scratch: bool = True):
        import types

        self.built = []
        lib = self

        class Native:
            @staticmethod
            def TritonKernel(*args, **kwargs):  # noqa: N802
                if kwargs and not accepts_scratch:
                    raise TypeError("TritonKernel(): incompatible function arguments")
                lib.built.append((args, kwargs))
                return object()

        self.triton_kernel_call_lib = Native()

        def compile_ttir_inplace(ttir, backend, options, compute_capability, platform):
            metadata = {}
            backend.make_llir(ttir, metadata, options, compute_capability)
            return types.SimpleNamespace(binary=f"ptx of {ttir}", name="kernel", shared_mem_bytes=0)

        self.compile_ttir_inplace = compile_ttir_inplace


class _FakeBackend:
    def __init__(self, scratch: int, total_warps: int | None = None):
        self.scratch, self.total_warps = scratch, total_warps

    def make_llir(self, src, metadata, options, capability):
        if self.total_warps is not None:
            metadata["num_warps"] = self.total_warps
        metadata["global_scratch_size"], metadata["global_scratch_align"] = self.scratch, 128 if self.scratch else 1
        return "llir"


def _compile_and_build(lib, ttir, backend, num_warps=8):
    import types

    from jaxmoe._compat import jax_triton as compat

    compat.patch_lib(lib)
    result = lib.compile_ttir_inplace(ttir, backend, types.SimpleNamespace(num_warps=num_warps), 90, "cuda")
    return lib.triton_kernel_call_lib.TritonKernel("kernel", num_warps, 1, 0, result.binary, "tt.func @k", 90)


def test_jax_triton_03_patch_passes_the_global_scratch_and_warp_count():
    """jax-triton 0.3.x builds jaxlib's kernel without Triton's global scratch size (the
    device-side tensor descriptors' buffer) and with the caller's warp count: the patch
    passes both from the compiled kernel's metadata, and only where a kernel needs them."""
    lib = _FakeLib()
    _compile_and_build(lib, "plain", _FakeBackend(0))
    _compile_and_build(lib, "tma", _FakeBackend(256))
    _compile_and_build(lib, "specialised", _FakeBackend(128, total_warps=12), num_warps=4)
    (plain, plain_kw), (tma, tma_kw), (ws, ws_kw) = lib.built
    assert plain_kw == {} and plain[1] == 8 and plain[5] == ""  # the TTIR dropped from the payload
    assert tma_kw == {"global_scratch_size": 256, "global_scratch_align": 128} and tma[1] == 8
    assert ws_kw == {"global_scratch_size": 128, "global_scratch_align": 128} and ws[1] == 12


def test_jax_triton_03_patch_refuses_scratch_an_old_jaxlib_cannot_allocate():
    lib = _FakeLib(accepts_scratch=False)
    _compile_and_build(lib, "plain", _FakeBackend(0))  # kernels without scratch build as before
    with pytest.raises(RuntimeError, match="global scratch.*JAXMOE_TMA"):
        _compile_and_build(lib, "tma", _FakeBackend(128))
