"""Triton's interpreter: what it gets wrong, put right while jaxmoe runs a kernel on a CPU.

Written against Triton 3.6 to 3.9 (``TESTED``); on a version outside that range the
patches are applied all the same (each checks the shape of what it replaces) and a
warning says so. ``tests/test_compat.py`` checks each defect still exists in the
unpatched interpreter, so a Triton that fixes one fails that test and the patch can go.

* ``tl.dot`` on bf16: the interpreter stores bf16 as raw uint16 and multiplies those bit
  patterns, so bf16 operands are widened to fp32 first (fp16 and fp32 multiply right).
* fp32 -> bf16 casts: the interpreter truncates; a GPU rounds to nearest even. Left alone,
  the CPU path's bf16 error would be about twice the GPU's, so the cast rounds to nearest
  even (NaN stays NaN).
* casts to and from fp8 ``e4m3fn`` (``tl.float8e4nv``): the interpreter rounds fp32 -> fp8
  half up and loses a mantissa carry (a value just below a power of two comes out half as
  large); the casts go through ``ml_dtypes`` instead, round to nearest even and, as the
  GPU's ``cvt.rn.satfinite``, saturate at +-448 (NaN stays NaN).
* ``triton.language``'s own ``@jit`` functions (``tl.sort``, ``tl.cumsum``'s combine,
  ``tl.max``, ...) were built compiled, since ``triton.jit`` decides at import; for the run
  they are swapped for interpreted twins.
* The interpreter patches the builtins of every ``triton.language`` module that a called
  ``@jit`` helper's globals name, and never undoes that for helpers (``tl.core``, seen from
  ``triton.language.standard``): a later real compile in the same process then built
  interpreter tensors. Every ``triton.language`` namespace is put back afterwards.
* ``tl.dot_scaled``: the interpreter has no ``create_dot_scaled``. The product jaxmoe's
  mxfp4 GEMM asks for (a bf16 lhs without scales times a K-packed e2m1 rhs with e8m0
  scales) is computed as Triton's Hopper lowering does it: each e2m1 value times its
  scale rounded to bf16 (the scale read as bf16 bits ``e << 7``: 0 for ``e = 0``, NaN for
  255), then an fp32 product; any other combination raises ``NotImplementedError``.
* A scalar kernel argument used as a Python index (``range(n)`` on a runtime ``n``): Triton
  3.6 converts the interpreter's one-element array with ``int(array)``, which NumPy >= 2.5
  refuses for arrays of one dimension; the conversion squeezes the array first, as later
  Triton versions do.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["patches", "TESTED", "round_f32_to_bf16_bits", "bf16_bits_to_f32", "f32_to_e4m3fn_bits",
           "e4m3fn_bits_to_f32"]

TESTED = ((3, 6), (3, 9))

# e2m1 code -> value (sign bit 3, exponent bits 2-1, mantissa bit 0)
E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)  # inclusive range of (major, minor) versions


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def round_f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) of fp32 values, rounded to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if np.any(nan):
        rounded = np.where(nan, ((bits >> 16) | np.uint32(0x0040)).astype(np.uint16), rounded)
    return rounded


def f32_to_e4m3fn_bits(x: np.ndarray) -> np.ndarray:
    """fp8 e4m3fn bit patterns (uint8) of fp32 values: nearest even, saturating at +-448."""
    import ml_dtypes

    x = np.asarray(x, np.float32)
    return np.clip(x, -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)


def e4m3fn_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    import ml_dtypes

    return np.asarray(bits, np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def _version() -> tuple[int, int]:
    import triton

    major, minor = (int(p) for p in triton.__version__.split(".")[:2])
    return major, minor


@functools.cache
def _warn_untested() -> None:
    if not TESTED[0] <= _version() <= TESTED[1]:
        import triton

        warnings.warn(f"jaxmoe's interpreter patches were tested with Triton {TESTED[0]}-{TESTED[1]}, "
                      f"this is {triton.__version__}: CPU results may be off", RuntimeWarning, stacklevel=3)


@functools.cache
def _interpreted_twin(fn: Any) -> Any:
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(fn.fn)


@contextlib.contextmanager
def patches(buffers: Sequence[tuple[int, int]] = (), kernel: str = "kernel") -> Iterator[None]:
    """The interpreter, put right for the duration of one kernel run (not thread-safe:
    callers hold a lock).

    With ``buffers`` (``(address, nbytes)`` of every array the kernel is given), every load
    and store checks that each address its mask lets through lies inside one of them, and
    raises ``IndexError`` naming ``kernel`` where one does not: out-of-bounds accesses
    fail on a CPU as they would under a GPU's memcheck."""
    import triton.language as tl
    from triton.runtime import interpreter
    from triton.runtime.jit import JITFunction

    _warn_untested()
    builder_cls = type(interpreter.interpreter_builder)
    original_dot = builder_cls.create_dot
    original_dot_scaled = vars(builder_cls).get("create_dot_scaled")
    original_cast = builder_cls.cast_impl
    original_fp_to_fp = builder_cls.create_fp_to_fp
    original_load = builder_cls.create_masked_load
    original_store = builder_cls.create_masked_store
    spans = sorted((int(a), int(a) + int(n)) for a, n in buffers if n > 0)
    starts = np.array([a for a, _ in spans], np.uint64)
    ends = np.array([e for _, e in spans], np.uint64)

    def check(what: str, ptrs: Any, mask: Any) -> None:
        addresses = np.asarray(ptrs.data, np.uint64)[np.broadcast_to(np.asarray(mask.data, bool), ptrs.data.shape)]
        if addresses.size == 0:
            return
        size = np.uint64(np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize)
        at = np.searchsorted(starts, addresses, side="right").astype(np.int64) - 1
        inside = (at >= 0) & (addresses + size <= ends[np.maximum(at, 0)])
        if not inside.all():
            bad = int(addresses[~inside][0])
            raise IndexError(f"{kernel}: out-of-bounds {what} of {int((~inside).sum())} element(s), the first at "
                             f"{bad:#x}; the arguments span {[(hex(a), e - a) for a, e in spans]}")

    def create_masked_load(self, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile):
        check("load", ptrs, mask)
        return original_load(self, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile)

    def create_masked_store(self, ptrs, value, mask, cache_modifier, eviction_policy):
        check("store", ptrs, mask)
        return original_store(self, ptrs, value, mask, cache_modifier, eviction_policy)

    def widen(handle: Any) -> np.ndarray:
        if handle.dtype == tl.bfloat16:
            return bf16_bits_to_f32(handle.data)
        if handle.dtype == tl.float8e4nv:
            return e4m3fn_bits_to_f32(handle.data)
        return handle.data.astype(np.float32)

    def create_dot_scaled(self, lhs, lhs_scale, lhs_format, rhs, rhs_scale, rhs_format, fast_math, lhs_k_pack,
                          rhs_k_pack, acc):
        from triton._C.libtriton import ir

        kinds = ir.ScaleDotElemTypeTY
        if not (lhs_scale is None and lhs_format == kinds.BF16 and rhs_format == kinds.E2M1 and rhs_k_pack
                and rhs_scale is not None and rhs.data.ndim == 2):
            raise NotImplementedError("the interpreter's tl.dot_scaled (a jaxmoe patch) takes a bf16 lhs without "
                                      "scales times a K-packed e2m1 rhs with e8m0 scales only")
        packed = rhs.data  # [K // 2, N]: value 2i in the low nibble, 2i + 1 in the high one
        values = np.stack([E2M1_VALUES[packed & 0xF], E2M1_VALUES[packed >> 4]], axis=1)
        values = values.reshape(2 * packed.shape[0], packed.shape[1])
        e = rhs_scale.data.astype(np.int32)  # [N, K // 32]
        scale = np.where(e == 255, np.nan, np.where(e == 0, 0.0, np.ldexp(1.0, e - 127))).astype(np.float32)
        scale = np.repeat(scale.T, values.shape[0] // scale.shape[1], axis=0)
        with np.errstate(invalid="ignore", over="ignore"):
            w = bf16_bits_to_f32(round_f32_to_bf16_bits(values * scale))
            out = np.matmul(widen(lhs), w, dtype=np.float32) + acc.data
        return interpreter.TensorHandle(out.astype(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if any(h.dtype in (tl.bfloat16, tl.float8e4nv) for h in (a, b)):
            a = interpreter.TensorHandle(widen(a), tl.float32)
            b = interpreter.TensorHandle(widen(b), tl.float32)
        return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(round_f32_to_bf16_bits(src.data), tl.bfloat16)
        if dst_type.scalar == tl.float8e4nv and src.dtype.scalar != tl.float8e4nv:
            return interpreter.TensorHandle(f32_to_e4m3fn_bits(widen(src)), tl.float8e4nv)
        if src.dtype.scalar == tl.float8e4nv and dst_type.scalar != tl.float8e4nv and dst_type.scalar.is_floating():
            wide = interpreter.TensorHandle(e4m3fn_bits_to_f32(src.data), tl.float32)
            return wide if dst_type.scalar == tl.float32 else cast_impl(self, wide, dst_type)
        return original_cast(self, src, dst_type)

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if dst_type.scalar == tl.float8e4nv and src.dtype.scalar != tl.float8e4nv:
            return interpreter.TensorHandle(f32_to_e4m3fn_bits(widen(src)), tl.float8e4nv)
        if src.dtype.scalar == tl.float8e4nv and dst_type.scalar != tl.float8e4nv:
            return cast_impl(self, src, dst_type)
        return original_fp_to_fp(self, src, dst_type, rounding_mode)

    try:  # imported lazily by triton's argument specialisation; must see the real functions
        import triton.experimental.gluon  # noqa: F401
    except ImportError:
        pass
    namespaces = (tl, tl.standard, tl.core, tl.math, tl.core.tensor, tl.core.tensor_descriptor_base)
    saved = [(ns, dict(vars(ns))) for ns in namespaces]  # restored below, twins included
    for module in (tl, tl.standard, tl.core, tl.math):
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                vars(module)[name] = _interpreted_twin(value)
    original_patch_tensor = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original_patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    builder_cls.create_dot = create_dot
    builder_cls.create_dot_scaled = create_dot_scaled
    builder_cls.cast_impl = cast_impl
    if spans:
        builder_cls.create_masked_load = create_masked_load
        builder_cls.create_masked_store = create_masked_store
    builder_cls.create_fp_to_fp = create_fp_to_fp
    interpreter._patch_lang_tensor = patch_lang_tensor
    try:
        yield
    finally:
        builder_cls.create_dot = original_dot
        if original_dot_scaled is None:
            del builder_cls.create_dot_scaled
        else:
            builder_cls.create_dot_scaled = original_dot_scaled
        builder_cls.cast_impl = original_cast
        builder_cls.create_fp_to_fp = original_fp_to_fp
        builder_cls.create_masked_load = original_load
        builder_cls.create_masked_store = original_store
        interpreter._patch_lang_tensor = original_patch_tensor
        for ns, before in saved:
            for name, value in before.items():
                if vars(ns).get(name) is not value:
                    setattr(ns, name, value)
