"""Block configurations of the MoE GEMMs: a heuristic, overridden by tuned JSON per arch.

A :class:`MoEConfig` fixes BLOCK_M (shared by the alignment and both GEMM stages, since
they walk the same padded blocks) and one :class:`GemmTile` per stage. Tuned files live in
``jaxmoe/configs/<arch>.json``::

    {"E=8,D=4096,I=14336,dtype=bfloat16": {"1": {"block_m": 16, "stage1": {...}, "stage2": {...}}, "64": ...}}

keyed by the layer shape and then by M buckets (the entry with the largest bucket <= M is
used; below a table's smallest bucket for the shape the next table is asked, then the
heuristic). Beside an arch's table, a GPU model may have its own, ``<arch>-<device>.json``
(``sm90-NVIDIA_H200.json``; the device as :func:`jaxmoe.backends.platform.device_name`
names it), as vLLM keeps one table per device: an H200 and an H100 share sm_90 code but
not their best tiles. Directories are looked up in this order, and in each the device's
table before the arch's; the first table with a bucket for the layer shape at or below M
wins (:func:`config_dirs`, :func:`table_names`):

1. ``$JAXMOE_CONFIG_DIR``, when set;
2. the user directory, ``$XDG_CONFIG_HOME/jaxmoe`` or ``~/.config/jaxmoe``, where
   ``python -m jaxmoe tune`` writes by default (:func:`user_config_dir`);
3. the package's own tables, ``jaxmoe/configs``.

Shapes that no table names use :func:`heuristic_config`. Every table is checked as it is
read: a malformed file raises a ``ValueError`` naming the file and the entry.
``JAXMOE_LOG_CONFIG=1`` prints the config each call picks.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

ARCHS = ("sm90", "gfx942", "gfx950")
PACKAGE_CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"  # jaxmoe/configs

# Shared memory (NVIDIA) / LDS (AMD) per program, bytes.
SHARED_MEMORY_LIMIT = {"sm90": 227 * 1024, "gfx942": 64 * 1024, "gfx950": 160 * 1024}
NUM_XCDS = {"sm90": 1, "gfx942": 8, "gfx950": 8}


@dataclasses.dataclass(frozen=True)
class GemmTile:
    """Tile of one GEMM stage."""

    block_n: int
    block_k: int
    group_size_m: int = 1
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1  # programs per C tile along K (stage 2 only; see plan_gemm)
    prequant_a: bool = False  # act_quant: A rounded to 8 bits by a launch before the GEMM (see plan_gemm)
    tma: bool = False  # sm_90: B's tiles by TMA through a tensor descriptor where it can (b_descriptor_view)

    def shared_bytes(self, block_m: int, itemsize: int, fused: bool, b_itemsize: int | None = None) -> int:
        """Shared memory the software pipeline needs: A tile plus one (or two) B tiles per
        stage (``b_itemsize``: B's stored bytes per element, default ``itemsize``; 1 for
        quantized weights, which also counts, for 4-bit ones, the tile converted for the dot;
        A's elements take a byte with ``prequant_a``)."""
        b_tiles = 2 if fused else 1
        b_itemsize = itemsize if b_itemsize is None else b_itemsize
        a_itemsize = 1 if self.prequant_a else itemsize
        return ((block_m * self.block_k * a_itemsize + b_tiles * self.block_k * self.block_n * b_itemsize)
                * self.num_stages)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """BLOCK_M plus the tiles of stage 1 (gate/up, activation fused) and stage 2 (down)."""

    block_m: int
    stage1: GemmTile
    stage2: GemmTile

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for stage in ("stage1", "stage2"):
            if d[stage]["split_k"] == 1:  # the defaults: tables name them only where they differ
                del d[stage]["split_k"]
            for flag in ("prequant_a", "tma"):
                if not d[stage][flag]:
                    del d[stage][flag]
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> MoEConfig:
        return MoEConfig(int(d["block_m"]), GemmTile(**d["stage1"]), GemmTile(**d["stage2"]))


def shape_key(num_experts: int, hidden: int, intermediate: int, dtype: Any, weights: str = "none",
              act_quant: str | None = None) -> str:
    """A table's layer key: ``E=..,D=..,I=..,dtype=..`` plus ``,w=<scheme>[,a=<act_quant>]``
    for quantized weights (each scheme has its own entries)."""
    key = f"E={num_experts},D={hidden},I={intermediate},dtype={np.dtype(dtype).name}"
    if weights != "none":
        key += f",w={weights}"
    if act_quant is not None:
        key += f",a={act_quant}"
    return key


def fit_scheme(tile: GemmTile, weights: str, act_quant: str | None) -> GemmTile:
    """``tile`` with a K tile the weight and activation schemes can use: inside one scale
    group for per-group scales (fp8_block, int4: <= 128), exactly one 128-channel group for
    fp8 activations against fp8_block weights, whole mxfp4 scale groups (>= 32), >= 32 for
    8-bit dots."""
    k = tile.block_k
    if weights in ("fp8_block", "int4", "int4_zp"):
        k = min(k, 128)
    if weights == "fp8_block" and act_quant is not None:
        k = 128
    if act_quant is not None or weights == "mxfp4":
        k = max(k, 32)
    return tile if k == tile.block_k else dataclasses.replace(tile, block_k=k)


# fp8 activations against per-channel or per-tensor fp8 weights ("fp8_token" A): with
# JAXMOE_FP8_FAST_ACCUM=1 the sum over K stays in the MMA's accumulator (``FP8_MMA_ACC``)
# instead of a fresh fp32 partial per K tile added in registers. Triton 3.6 then keeps one
# MMA group in flight across K steps (``wgmma.wait_group 1``, as bf16 does; the fresh
# partial waits for each step's MMA), and the GEMM keeps one accumulator tile, not two.
# Hopper's fp8 MMA accumulates with fewer bits than fp32, so this departs from
# ``Numerics.accum_dtype``. Measured on an H100 (Mixtral-8x7B fp8 w8a8, the layer with
# routing): M = 1024 1.26 -> 1.00 ms, M = 4096 4.08 -> 2.85 ms; error against the fp32
# rounding model at M = 4096 5.4e-3 -> 1.6e-2 (worst row 2.5e-2 -> 3.2e-2). Off by default.
FAST_ACCUM_ENV = "JAXMOE_FP8_FAST_ACCUM"


def env_flag(name: str) -> bool:
    """An on/off environment variable: unset or ``0`` (``false``, ``off``, ``no``) is off,
    ``1`` (``true``, ``on``, ``yes``) on, anything else a ValueError naming it."""
    env = os.environ.get(name, "").strip().lower()
    if env in ("", "0", "false", "off", "no"):
        return False
    if env in ("1", "true", "on", "yes"):
        return True
    raise ValueError(f"{name} must be unset, 1 or 0, got {os.environ[name]!r}")


def fp8_fast_accum() -> bool:
    """Whether ``JAXMOE_FP8_FAST_ACCUM`` asks fp8 w8a8 GEMMs with per-token activation scales
    to sum over K inside the fp8 MMA (read when a call is planned, i.e. traced)."""
    return env_flag(FAST_ACCUM_ENV)


def a_scheme_for(w_scheme: str, act_quant: str | None) -> str:
    """The kernel's ``A_SCHEME`` for weights of ``w_scheme`` and the layer's ``act_quant``:
    per token, or per token and 128 channels against fp8_block weights (DeepSeek-V3)."""
    if act_quant is None:
        return "none"
    if act_quant == "fp8":
        return "fp8_group" if w_scheme == "fp8_block" else "fp8_token"
    return "int8_token"


def fp8_mma_accumulate(a_scheme: str) -> bool:
    """Whether a GEMM with activation scheme ``a_scheme`` sums over K inside the fp8 MMA
    (:func:`fp8_fast_accum`, for ``"fp8_token"`` A: fp8 or fp8_tensor weights)."""
    return a_scheme == "fp8_token" and fp8_fast_accum()


def fast_accum_applies(weights: str, act_quant: str | None) -> bool:
    """Whether a layer's GEMMs with these weights and ``act_quant`` sum over K inside the
    fp8 MMA (:func:`fp8_mma_accumulate`)."""
    return fp8_mma_accumulate(a_scheme_for(weights, act_quant))


def two_accumulators(weights: str, act_quant: str | None) -> bool:
    """Whether the GEMM keeps a second fp32 tile beside its accumulator: each K step's
    partial product, scaled per K group (fp8_block, int4) or added outside the fp8 MMA
    (fp8 activations, unless :func:`fast_accum_applies`)."""
    if weights in ("fp8_block", "int4", "int4_zp"):
        return True
    return act_quant == "fp8" and not fast_accum_applies(weights, act_quant)


# fp32 registers per thread one accumulator tile may take when the GEMM keeps two: two
# 128 x 256 tiles over 8 warps (128 registers each) leave nothing for the pipeline's
# operands, and ptxas spills 0.3-1.4 KB a thread to local memory (sm_90, measured with
# ``ptxas -v``); at 64 a tile both fit in the 255 registers.
TWO_ACCUMULATOR_REGISTERS = 64


def fit_accumulators(tile: GemmTile, block_m: int, fused: bool, weights: str, act_quant: str | None) -> GemmTile:
    """``tile`` narrowed (BLOCK_N halved, down to 32) until, for a GEMM that keeps two fp32
    tiles (:func:`two_accumulators`), each takes at most ``TWO_ACCUMULATOR_REGISTERS``
    registers per thread (the fused stage's tile is 2 * BLOCK_N wide)."""
    if not two_accumulators(weights, act_quant):
        return tile
    width = 2 if fused else 1
    while (block_m * width * tile.block_n > TWO_ACCUMULATOR_REGISTERS * 32 * tile.num_warps
           and tile.block_n > 32):
        tile = dataclasses.replace(tile, block_n=tile.block_n // 2)
    return tile


def swap_ab(w_scheme: str, a_scheme: str) -> bool:
    """Whether the GEMM multiplies B's converted tile as the MMA's first operand (C
    transposed), which sm_90 takes from registers instead of shared memory: weight-only
    int4 and int4_zp (H200, Mixtral-8x7B M = 128 19 % faster, Qwen3-30B-A3B 10 %; M = 1
    within the noise). 8-bit weights gain nothing at decode sizes: their 16- and 32-row
    blocks run ``mma.sync`` from registers already."""
    return w_scheme in ("int4", "int4_zp") and a_scheme == "none"


def scaled_dot(w_scheme: str, dtype: Any, arch: str) -> bool:
    """Whether mxfp4 weights go through Triton's ``tl.dot_scaled``: bf16 activations on sm_90
    and gfx950 (H200: 1.9-2.7x faster than the kernel's own e2m1 conversion at M = 1 and
    128). gfx942's lowering of it fails at 128-row tiles in Triton 3.6; fp16 and fp32
    activations keep the kernel's conversion."""
    return w_scheme == "mxfp4" and np.dtype(dtype).name == "bfloat16" and arch in ("sm90", "gfx950")


TMA_ENV = "JAXMOE_TMA"
TMA_SCHEMES = ("none", "fp8", "fp8_tensor", "fp8_block", "int8")  # B stored as plain [E, N, K] values
TMA_BOX_MAX = 256  # elements per dimension of one TMA box


def tma_override() -> bool | None:
    """``JAXMOE_TMA``: ``1`` reads B by TMA in every GEMM that can, ``0`` in none; unset,
    each tile's ``tma`` decides (tables and the heuristic). Read when a call is traced."""
    env = os.environ.get(TMA_ENV, "").strip().lower()
    if env == "":
        return None
    return env_flag(TMA_ENV)


def b_descriptor_view(*, arch: str, w_scheme: str, a_scheme: str, transpose_b: bool, fused: bool, gate_up: str,
                      a_itemsize: int, b_itemsize: int, n: int, k: int, block_n: int, block_k: int,
                      requested: bool = False) -> str:
    """The ``B_DESC`` view through which ``moe_gemm_kernel`` loads B's tiles (TMA on sm_90):
    ``"none"`` (pointer loads) unless descriptors are asked for (``JAXMOE_TMA=1``, or the
    tile's ``tma`` = ``requested`` when the variable is unset) and TMA can
    read this B as stored (unpacked 8- or 16-bit values, not the 4-bit converted as the
    MMA's first operand; every stride but the last a multiple of 16 bytes; no box dimension
    above 256 elements, its innermost at least 16 bytes). fp32 A (``a_itemsize`` 4) keeps
    pointer loads: its exact product runs on the FMA units from registers, where a
    descriptor's tile only adds spills (sm_90, Mixtral-8x7B's stage 1: 13.9 -> 48.6 KB a thread).

    ``"nk"`` / ``"kn"``: B read as ``[E, N, K]`` / ``[E, K, N]``; ``"nk_gate_up"`` /
    ``"kn_gate_up"``: stage 1's concatenated gate and up halves, one box holding a column
    block's gate rows and its up rows. ``n`` is B's N (both halves), ``k`` its K. On an
    H100 the bf16 forward of Mixtral-8x7B is 8-10 % faster at M = 1024 and 4096 with it,
    DeepSeek-V3's 3 % faster at M = 4096, Qwen3-30B-A3B's unchanged at M = 4096 and 3-5 %
    slower at M = 1024 (each program builds its descriptor before its K loop), the fp8 w8a8
    layers 1-2 % slower: tables turn it on per shape and card.
    """
    override = tma_override()
    if not (requested if override is None else override) or arch != "sm90":
        return "none"
    if w_scheme not in TMA_SCHEMES or swap_ab(w_scheme, a_scheme) or a_itemsize > 2:
        return "none"
    halves = fused and gate_up == "concat"
    width = block_n if halves else (2 * block_n if fused else block_n)
    contiguous = block_n if halves and transpose_b else (width if transpose_b else block_k)
    if max(width, block_k) > TMA_BOX_MAX or contiguous * b_itemsize < 16 or (contiguous * b_itemsize) % 16:
        return "none"
    # the strides (bytes) other than the innermost: K (or N, or N / 2 for the gate/up view) elements
    row = (n // 2 if halves else n) if transpose_b else k
    if (row * b_itemsize) % 16:
        return "none"
    return ("kn" if transpose_b else "nk") + ("_gate_up" if halves else "")


INT4_SPLIT_ENV = "JAXMOE_INT4_SPLIT"


def int4_split(*, w_scheme: str, a_scheme: str, k: int, block_k: int) -> bool:
    """Whether an int4 / int4_zp GEMM (weight-only, ``SWAP_AB``) reads A with each K tile's
    even columns stored before its odd ones (``A_SPLIT`` of ``moe_gemm_kernel``): each
    byte's low nibbles then multiply the tile's first half and its high nibbles the second,
    each converted where it lies, with no interleaving of the converted tile in registers
    and both halves of A loaded by the asynchronous copy. The sm_90 K loop of Mixtral-8x7B's
    stage 1 / 2 compiles to 3.77 / 4.48 instructions a weight at M = 1 instead of 4.32 /
    4.92, and to 7.72 / 7.53 instead of 8.62 / 8.34 at M = 4096 (``nvdisasm``; most of the
    rest are ``PRMT`` moves into the MMA's operand registers, as many as before). Not yet
    timed on a GPU, so off unless ``JAXMOE_INT4_SPLIT=1``; needs K a multiple of ``block_k`` (whole tiles) and
    ``block_k >= 32`` (half tiles of at least 16 for the dot). Read when a call is traced."""
    if not env_flag(INT4_SPLIT_ENV):
        return False
    return swap_ab(w_scheme, a_scheme) and k % block_k == 0 and block_k >= 32


def rows_per_expert(num_rows: int, num_experts: int) -> float:
    """Average sorted rows ((token, slot) pairs) per expert that can receive any."""
    return num_rows / max(min(num_experts, num_rows), 1)


# How many times a GEMM program whose row block is mostly padding may halve its rows
# (``SPLIT_TAIL`` of ``moe_gemm_kernel``), by BLOCK_M. Only where it paid on an H100 (split
# vs not, alternated, medians): the layer compute-bound, >= SPLIT_TAIL_MIN_ROWS rows per
# expert on average (Qwen3-30B M=4096 3 % faster, M=8192 2 %, Mixtral-8x7B M=1024 2 %;
# below, weight streaming sets the pace: DeepSeek-V3 at 32 and 128 rows per expert was
# 0.7-1 % slower), and the tails a sizeable share of the work, at most
# SPLIT_TAIL_MAX_BLOCKS row blocks per expert (Mixtral-8x7B M=8192, 16 blocks: 2 % slower).
SPLIT_TAIL = {64: 1, 128: 2, 256: 2}
SPLIT_TAIL_MIN_ROWS = 192
SPLIT_TAIL_MAX_BLOCKS = 4


def split_tail(num_rows: int, num_experts: int, block_m: int) -> int:
    """``SPLIT_TAIL`` for a GEMM over ``num_rows`` sorted rows of ``num_experts`` experts."""
    if not SPLIT_TAIL_MIN_ROWS <= rows_per_expert(num_rows, num_experts) <= SPLIT_TAIL_MAX_BLOCKS * block_m:
        return 0
    return SPLIT_TAIL.get(block_m, 0)


# Stage 2 as a 128 x 256 tile, as wide as stage 1's (whose BLOCK_N columns are gate and
# up, so a 128-row stage 1 is 128 x 256 already): on an H100 0-10 % faster per layer than
# 128 x 128 at every 128-row shape measured (Mixtral-8x22B M=8192 18.6 -> 17.2 ms,
# Mixtral-8x7B M=1024 1.72 -> 1.55), never measurably slower. 192 KB of shared memory.
WIDE_STAGE2 = GemmTile(block_n=256, block_k=64, group_size_m=8, num_warps=8, num_stages=4)


EIGHT_BIT_WEIGHT_ONLY = ("fp8", "fp8_tensor", "int8")
# w8a8 from PREQUANT_MIN_ROWS rows per expert: A rounded to 8 bits by a pass before each
# GEMM (``prequant_a``), which then multiplies 8-bit tiles from shared memory, in K tiles
# of PREQUANT_BLOCK_K (128 one-byte values: a bf16 64-wide tile's bytes a row). Rounding
# in each program's tiles instead makes every column block of a row block read its A rows
# twice in bf16 (the per-token absmax pass, then the K loop). Measured on an H100
# (``python -m jaxmoe bench --act-quant``, the layer with routing, against rounding A in
# each program's tiles): fp8 Mixtral-8x7B M = 1024 4.04 -> 1.25 ms, M = 4096 13.8 ->
# 4.03 ms; Qwen3-30B-A3B 0.61 -> 0.32 and 1.87 -> 0.78 ms; int8 Mixtral-8x7B 3.25 -> 1.01
# and 10.8 -> 3.16 ms; fp8_block DeepSeek-V3 M = 4096 22.3 -> 9.24 ms, and at M = 1024 (32
# rows per expert, decode tiles) 8.70 -> 3.16 ms. K tiles of 64 instead: fp8 Mixtral-8x7B
# 1.81 and 5.40 ms, Qwen3-30B-A3B 0.36 and 1.00 ms. Below 32 rows per expert (not timed
# with the pass) each program rounds its own tiles, which saves the launch.
PREQUANT_BLOCK_K = 128
PREQUANT_MIN_ROWS = 32
# A 256-deep K tile where K gives it at least 8 steps (K >= 2048)
DEEP_K = 2048


def _quantized_decode(weights: str, block_m: int, hidden: int, intermediate: int, s1: GemmTile, s2: GemmTile
                      ) -> tuple[int, GemmTile, GemmTile]:
    """BLOCK_M and the tiles of weight-only quantized GEMMs that stream their weights (NVIDIA;
    stage 1's K is ``hidden``, stage 2's ``intermediate``).

    Measured on an H200 (``bench/quant_tiles.py``, Mixtral-8x7B and Qwen3-30B-A3B, M = 1 and
    128, each tile in place of one stage's):

    * 8-bit: row blocks of at most 32: 64-row ones run the MMA with B from shared memory,
      the converted tile written back there (Mixtral-8x7B M = 128, int8 and fp8, 25-37 %
      slower per stage than 32-row blocks). At 16 rows, 64 x 256 B tiles where K is long
      (stage 1 of Mixtral-8x7B M = 1 15-19 % faster than 64 x 128; stage 2, 8 warps, 2-10 %);
      Qwen3-30B-A3B's stage 2 (K = 768) was slower with them.
    * mxfp4 (``tl.dot_scaled``): 32 x 256 stage-1 and 64 x 256 stage-2 tiles (Mixtral-8x7B
      M = 1 6 % and 12 % faster per stage, M = 128 7 % and 10 %; Qwen3-30B-A3B within 4 %).
    """
    if weights in EIGHT_BIT_WEIGHT_ONLY:
        if block_m > 16:
            return 32, GemmTile(block_n=64, block_k=128, group_size_m=1, num_warps=4, num_stages=4), \
                GemmTile(block_n=128, block_k=128, group_size_m=1, num_warps=4, num_stages=4)
        if hidden >= DEEP_K:
            s1 = GemmTile(block_n=64, block_k=256, group_size_m=1, num_warps=4, num_stages=3)
        if intermediate >= DEEP_K:
            s2 = GemmTile(block_n=64, block_k=256, group_size_m=1, num_warps=8, num_stages=4)
    elif weights == "mxfp4":
        s1 = GemmTile(block_n=32, block_k=256, group_size_m=1, num_warps=4, num_stages=4)
        s2 = GemmTile(block_n=64, block_k=256, group_size_m=1, num_warps=4, num_stages=4)
    return block_m, s1, s2


def heuristic_config(num_tokens: int, top_k: int, num_experts: int, hidden: int, intermediate: int,
                     dtype: Any, arch: str = "sm90", weights: str = "none", act_quant: str | None = None
                     ) -> MoEConfig:
    """A sound default from the average rows per expert; untuned shapes land here. For
    quantized weights the same tiles, with K tiles the schemes can use (:func:`fit_scheme`),
    narrower where the GEMM keeps two accumulators (:func:`fit_accumulators`), and shared
    memory counted at a byte per weight element."""
    rows = rows_per_expert(num_tokens * top_k, num_experts)
    # Few rows per expert: the weights dominate, and an expert whose rows spill into a second
    # row block has its weights streamed twice. Cover the busier experts too (mean + two
    # standard deviations of the roughly Poisson row counts), not only the mean.
    busy = rows + 2.0 * rows**0.5
    if busy <= 16:
        block_m = 16
    elif busy <= 32:
        block_m = 32
    elif rows <= 96:
        block_m = 64
    else:
        block_m = 128
    # Up to ~32 rows per expert the layer streams weights: narrow, deep tiles (measured on
    # an H100 with the 64-row block: faster at 32 rows per expert on Mixtral-8x22B,
    # gpt-oss-120b and Qwen3-235B; slower or even at 64 rows).
    small = block_m <= 32 or rows <= 32
    amd = arch.startswith("gfx")
    if small:
        # decode: weight streaming dominates; wide K tiles, few rows
        s1 = GemmTile(block_n=64, block_k=128, group_size_m=1, num_warps=4, num_stages=2 if amd else 4)
        s2 = GemmTile(block_n=64, block_k=128, group_size_m=1, num_warps=4, num_stages=2 if amd else 4)
    elif amd:
        s1 = GemmTile(block_n=64, block_k=64, group_size_m=8, num_warps=4, num_stages=2)
        s2 = GemmTile(block_n=128, block_k=64, group_size_m=8, num_warps=4, num_stages=2)
    elif block_m == 128:
        s1 = GemmTile(block_n=128, block_k=64, group_size_m=8, num_warps=8, num_stages=3)
        s2 = WIDE_STAGE2
    else:
        s1 = GemmTile(block_n=128, block_k=64, group_size_m=8, num_warps=4, num_stages=3)
        s2 = GemmTile(block_n=128, block_k=64, group_size_m=8, num_warps=4, num_stages=4)
    if small and not amd and act_quant is None:
        block_m, s1, s2 = _quantized_decode(weights, block_m, hidden, intermediate, s1, s2)
    if weights == "mxfp4" and not amd and block_m == 128:
        # the scaled dot's converted 128 x 256 operand beside a 128 x 256 accumulator spills
        # (96 B a thread, ptxas -v, sm_90)
        s2 = dataclasses.replace(s2, block_n=min(s2.block_n, 128))
    if act_quant is not None and rows >= PREQUANT_MIN_ROWS:
        # 8-bit A and B: K tiles of PREQUANT_BLOCK_K, the bytes a row of bf16's 64
        s1 = dataclasses.replace(s1, prequant_a=True, block_k=max(s1.block_k, PREQUANT_BLOCK_K))
        s2 = dataclasses.replace(s2, prequant_a=True, block_k=max(s2.block_k, PREQUANT_BLOCK_K))
    b_itemsize = None if weights == "none" else 1
    s1, s2 = fit_scheme(s1, weights, act_quant), fit_scheme(s2, weights, act_quant)
    s1 = fit_accumulators(s1, block_m, True, weights, act_quant)
    s2 = fit_accumulators(s2, block_m, False, weights, act_quant)
    s1 = _fit(s1, block_m, dtype, arch, True, b_itemsize, weights, act_quant)
    s2 = _fit(s2, block_m, dtype, arch, False, b_itemsize, weights, act_quant)
    if small and act_quant is None:
        s2 = dataclasses.replace(s2, split_k=stage2_split_k(num_tokens, top_k, num_experts, hidden, intermediate,
                                                            s2, weights, arch))
    return MoEConfig(block_m, s1, s2)


# Stage 2 of an int4 decode layer streams a quarter of bf16's bytes a tile, and with few
# row blocks (one per expert hit at M = 1) and D / BLOCK_N column blocks it has too few
# programs to keep enough loads in flight (Mixtral-8x7B M = 1: 128 programs of 4 KB tiles
# on 132 SMs). A stage 2 of fewer than SPLIT_K_FEW_PROGRAMS programs has its K split,
# multiplying the programs up to SPLIT_K_PROGRAMS, while each split keeps
# SPLIT_K_MIN_STEPS K tiles or more to pipeline. Measured on an H100
# (``bench/quant_tiles.py``, fused_moe with int4 weights, medians of 20, Mixtral-8x7B /
# gpt-oss-120b): M = 1 0.152 / 0.061 ms unsplit, 0.124 / 0.050 ms in 8 / 4 splits (up to
# 1024 programs), 0.138-0.143 / 0.048-0.049 ms in 4 / 2 (up to 512); M = 2 0.201 / 0.081
# unsplit, 0.180 / 0.076 in 4 / 2 splits; int4_zp alike. Mixtral-8x7B at M = 4 (512
# programs unsplit) was 7 % slower in 2 splits, at M = 16 even. int8 weights (16 KB tiles)
# gained nothing at M = 1 or 2; mxfp4's scaled dot is bound by its instructions, not its
# loads: 4 splits made Mixtral-8x7B's M = 1 slower (0.19 -> 0.21 ms). Neither is split.
SPLIT_K_SCHEMES = ("int4", "int4_zp")
SPLIT_K_FEW_PROGRAMS = 384
SPLIT_K_PROGRAMS = 1024
SPLIT_K_MIN_STEPS = 4
SPLIT_K_MAX = 8


def stage2_split_k(num_tokens: int, top_k: int, num_experts: int, hidden: int, intermediate: int,
                   tile: GemmTile, weights: str, arch: str) -> int:
    """``split_k`` of a decode layer's stage 2 (``[M*k, I] @ w2[e]^T``, K = ``intermediate``)."""
    if weights not in SPLIT_K_SCHEMES or arch.startswith("gfx"):
        return 1
    programs = min(num_experts, num_tokens * top_k) * -(-hidden // tile.block_n)
    if programs >= SPLIT_K_FEW_PROGRAMS:
        return 1
    split = 1
    while (split * 2 <= SPLIT_K_MAX and programs * split * 2 <= SPLIT_K_PROGRAMS
           and intermediate // (split * 2) >= SPLIT_K_MIN_STEPS * tile.block_k):
        split *= 2
    return split


# The backward's GEMM tile (stage-2 backward, stage-1 backward, dx), one per BLOCK_M, dtype
# and arch, fitted to shared memory: the backward adds few compiled kernels whatever the
# forward's tuned tiles are. Training batches (BLOCK_M >= 64, many rows per expert) are
# compute-bound: there NVIDIA takes the forward heuristic's 128-wide tiles (8 warps at
# 128 rows, as stage 1's measured 128 x 256 tile), AMD stays at 64 x 64 (its 64 KiB LDS).
# Not yet tuned on a GPU.
BACKWARD_TILE = GemmTile(block_n=64, block_k=64, group_size_m=8, num_warps=4, num_stages=3)
BACKWARD_TILE_LARGE = {64: GemmTile(block_n=128, block_k=64, group_size_m=8, num_warps=4, num_stages=3),
                       128: GemmTile(block_n=128, block_k=64, group_size_m=8, num_warps=8, num_stages=3)}
# The data-gradient GEMMs (dy @ w2, d gate_up @ w1) at 128-row blocks with at least 512
# output columns: the forward stage 2's 256-wide tile (H200, bf16, M = 4096: 9-16 % faster
# than 128 x 64 x 3 stages on both GEMMs of Mixtral-8x7B, DeepSeek-V3 and Qwen3-30B-A3B).
BACKWARD_TILE_WIDE = GemmTile(block_n=256, block_k=64, group_size_m=8, num_warps=8, num_stages=4)


def backward_tile(block_m: int, dtype: Any, arch: str, fused: bool, n_out: int | None = None) -> GemmTile:
    """The backward's tile for rows of ``block_m`` (``fused``: the stage-1 backward, two B
    tiles; ``n_out``: a data-gradient GEMM's output columns, when known)."""
    tile = BACKWARD_TILE
    if not arch.startswith("gfx") and block_m >= 64:
        tile = BACKWARD_TILE_LARGE[min(block_m, 128)]
        if not fused and block_m >= 128 and n_out is not None and n_out >= 512:
            tile = BACKWARD_TILE_WIDE
    return _fit(tile, block_m, dtype, arch, fused)


@dataclasses.dataclass(frozen=True)
class BackwardTiles:
    """The backward's GEMM tiles for one forward config: ``g`` (``dy @ w2[e]``), ``dx``
    (``d gate_up @ w1[e]``), ``act`` (the stage-1 backward, stage 1 recomputed) and
    ``gate_up`` (``save_gate_up``'s forward stage 1 without its activation)."""

    g: GemmTile
    dx: GemmTile
    act: GemmTile
    gate_up: GemmTile


def backward_tiles(config: MoEConfig, dtype: Any, arch: str, hidden: int, intermediate: int,
                   block_m: int | None = None) -> BackwardTiles:
    """:func:`backward_tile` for each backward GEMM of a layer run with ``config``. Each reads
    its weights by TMA where the forward stage reading the same weights does (``tma`` of
    ``config.stage2`` for w2, of ``config.stage1`` for w1; ``JAXMOE_TMA`` overrides both):
    H100, Mixtral-8x7B's training step at M = 4096 4 % faster with every GEMM by TMA.
    ``block_m``: the rows' alignment (default ``config.block_m``)."""
    block_m = config.block_m if block_m is None else block_m
    w1_tma, w2_tma = config.stage1.tma, config.stage2.tma

    def tile(fused: bool, n_out: int | None, tma: bool) -> GemmTile:
        return dataclasses.replace(backward_tile(block_m, dtype, arch, fused=fused, n_out=n_out), tma=tma)

    return BackwardTiles(g=tile(False, intermediate, w2_tma), dx=tile(False, hidden, w1_tma),
                         act=tile(True, None, w1_tma), gate_up=tile(False, 2 * intermediate, w1_tma))


# The grouped weight gradient's tile, (BLOCK_N, BLOCK_K, num_warps, num_stages, BLOCK_R):
# output tiles of one expert, walking its rows BLOCK_R at a time. With many rows per expert
# (BLOCK_M >= 64) on NVIDIA a 128 x 256 tile over 64 rows a step, 8 warps, 3 stages (each
# operand prefetched two steps ahead; 176 KiB of shared memory). H100, bf16, M = 4096, with
# the K groups of weight_grad_k_group, d w2 (routing weight in the kernel) + d w1 per launch:
# Mixtral-8x7B 3.67 + 5.00 ms against 4.21 + 5.54 for the earlier 128 x 128 tile of 4 warps,
# Qwen3-30B-A3B 0.65 + 0.91 against 0.73 + 0.99 (with the row ids loaded a step ahead;
# before that the kernel kept two buffers whatever the stages, and this tile took 4.37 +
# 7.29 ms on Mixtral-8x7B). 128 x 128 tiles of 4 warps at 3-5 stages and of 8 warps were
# slower there; the training step's two weight gradients: bench/RESULTS.md.
# Elsewhere 64 x 64 over 32 rows (32 KiB of shared memory: fits every target).
WEIGHT_GRAD_TILE = (64, 64, 4, 2, 32)
WEIGHT_GRAD_TILE_LARGE = (128, 256, 8, 3, 64)


def weight_grad_tile(block_m: int, dtype: Any, arch: str | None) -> tuple[int, int, int, int, int]:
    """The weight gradient's tile for rows aligned to ``block_m`` (``arch`` None: the small
    tile, which fits every target). BLOCK_R divides BLOCK_M and is >= 16 (``tl.dot``)."""
    tile = WEIGHT_GRAD_TILE
    if arch is not None and not arch.startswith("gfx") and block_m >= 64:
        tile = WEIGHT_GRAD_TILE_LARGE
    block_n, block_k, warps, stages, block_r = tile
    return block_n, block_k, warps, stages, min(block_r, block_m)


# Row steps (of BLOCK_R) a weight-gradient program runs, at least, where the output allows:
# with few rows per expert (DeepSeek-V3: 256 experts, ~128 rows each at M = 4096) a program
# per output tile is two steps of loads it mostly waits on; a program that runs several
# tiles along K in one loop overlaps each tile's loads with the last one's MMAs (H200,
# bf16, M = 4096: DeepSeek-V3's d w1 and d w2 7-15 % faster than one tile per program,
# Qwen3-30B-A3B's 1-2 %, Mixtral-8x7B's within 2 %).
WEIGHT_GRAD_STEPS = 64


def weight_grad_k_group(rows_per_expert: float, block_r: int, num_k_blocks: int) -> int:
    """Output tiles along K per weight-gradient program: enough that a program runs
    :data:`WEIGHT_GRAD_STEPS` row steps for an expert of ``rows_per_expert`` rows, rounded
    up to a power of two (a constexpr: few distinct kernels over batch sizes), at most the
    tiles there are."""
    steps = max(1, -(-int(np.ceil(rows_per_expert)) // block_r))
    want = -(-WEIGHT_GRAD_STEPS // steps)
    return max(1, min(num_k_blocks, 1 << (want - 1).bit_length()))


def _fit(tile: GemmTile, block_m: int, dtype: Any, arch: str, fused: bool, b_itemsize: int | None = None,
         weights: str = "none", act_quant: str | None = None) -> GemmTile:
    """Shrink stages, then BLOCK_K (where the schemes allow), then BLOCK_N, until the tile
    fits the arch's shared memory."""
    itemsize = np.dtype(dtype).itemsize
    limit = SHARED_MEMORY_LIMIT[arch]
    fixed_k = weights == "fp8_block" and act_quant is not None  # one 128-channel group per K tile
    while tile.shared_bytes(block_m, itemsize, fused, b_itemsize) > limit:
        if tile.num_stages > 2:
            tile = dataclasses.replace(tile, num_stages=tile.num_stages - 1)
        elif tile.block_k > 32 and not fixed_k:
            tile = dataclasses.replace(tile, block_k=tile.block_k // 2)
        elif tile.block_n > 32:
            tile = dataclasses.replace(tile, block_n=tile.block_n // 2)
        elif fixed_k and tile.num_stages > 1:  # 128-wide K tiles on a small LDS: no pipeline
            tile = dataclasses.replace(tile, num_stages=1)
        else:
            break
    return tile


def user_config_dir() -> pathlib.Path:
    """``$XDG_CONFIG_HOME/jaxmoe`` (an absolute ``XDG_CONFIG_HOME``), else ``~/.config/jaxmoe``."""
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    base = pathlib.Path(xdg) if xdg and os.path.isabs(xdg) else pathlib.Path.home() / ".config"
    return base / "jaxmoe"


def config_dir() -> pathlib.Path:
    """Where ``python -m jaxmoe tune`` writes by default: ``$JAXMOE_CONFIG_DIR`` if set, else
    :func:`user_config_dir` (both are read before the package's tables)."""
    env = os.environ.get("JAXMOE_CONFIG_DIR", "")
    return pathlib.Path(env) if env else user_config_dir()


def config_dirs() -> list[pathlib.Path]:
    """The directories :func:`select_config` reads, first match wins: ``$JAXMOE_CONFIG_DIR``
    (when set), the user directory, then the package's tables."""
    dirs = []
    env = os.environ.get("JAXMOE_CONFIG_DIR", "")
    if env:
        dirs.append(pathlib.Path(env))
    dirs += [user_config_dir(), PACKAGE_CONFIGS]
    return list(dict.fromkeys(dirs))


_SHAPE_KEY = re.compile(r"E=[1-9][0-9]*,D=[1-9][0-9]*,I=[1-9][0-9]*,dtype=(bfloat16|float16|float32)"
                        r"(,w=(fp8|fp8_tensor|fp8_block|int8|int4|int4_zp|mxfp4)(,a=(fp8|int8))?)?")
_TILE_FIELDS = tuple(f.name for f in dataclasses.fields(GemmTile))
_TILE_REQUIRED = ("block_n", "block_k")
_POWER_OF_TWO = ("block_n", "block_k", "num_warps")
_TILE_FLAGS = ("prequant_a", "tma")


def table_names(arch: str, device: str | None) -> list[str]:
    """The table files one config directory may hold for ``arch`` on ``device``, in lookup
    order: ``<arch>-<device>.json`` (when a device is named), then ``<arch>.json``."""
    return ([f"{arch}-{device}.json"] if device else []) + [f"{arch}.json"]


class _CurrentDevice:
    def __repr__(self) -> str:
        return "CURRENT_DEVICE"


# ``select_config``'s default device: the GPU model of the default platform where ``arch`` is
# that platform's arch, else none (a CPU, whose interpreter runs the sm90 plans, or
# ahead-of-time planning for another target).
CURRENT_DEVICE: Any = _CurrentDevice()


def current_device(arch: str) -> str | None:
    """The device whose table :func:`select_config` reads for ``arch`` by default."""
    from jaxmoe.backends.platform import GPU_PLATFORMS, arch_for, default_platform, device_name

    platform = default_platform()
    if platform not in GPU_PLATFORMS or arch_for(platform) != arch:
        return None
    return device_name(platform)


def _table_error(path: str, where: str, what: str) -> ValueError:
    return ValueError(f"jaxmoe config table {path}: {where}: {what}")


def _check_int(path: str, where: str, name: str, v: Any, *, power_of_two: bool = False, minimum: int = 1) -> None:
    if not isinstance(v, int) or isinstance(v, bool):
        raise _table_error(path, where, f"{name} must be an integer, got {type(v).__name__} {v!r}")
    if v < minimum:
        raise _table_error(path, where, f"{name} must be >= {minimum}, got {v}")
    if power_of_two and v & (v - 1):
        raise _table_error(path, where, f"{name} must be a power of two, got {v}")


def _check_tile(path: str, where: str, tile: Any) -> None:
    if not isinstance(tile, dict):
        raise _table_error(path, where, f"must be an object of {list(_TILE_FIELDS)}, got {type(tile).__name__}")
    unknown = sorted(set(tile) - set(_TILE_FIELDS))
    if unknown:
        raise _table_error(path, where, f"unknown keys {unknown} (known: {list(_TILE_FIELDS)})")
    missing = [f for f in _TILE_REQUIRED if f not in tile]
    if missing:
        raise _table_error(path, where, f"missing {missing}")
    for name, v in tile.items():
        if name in _TILE_FLAGS:
            if not isinstance(v, bool):
                raise _table_error(path, where, f"{name} must be true or false, got {type(v).__name__} {v!r}")
            continue
        _check_int(path, where, name, v, power_of_two=name in _POWER_OF_TWO,
                   minimum=16 if name in _TILE_REQUIRED else 1)  # tl.dot tiles are >= 16


def check_entry(path: str, where: str, entry: Any) -> MoEConfig:
    """One ``{"block_m", "stage1", "stage2"}`` entry of a table as a :class:`MoEConfig`, or a
    ``ValueError`` naming ``path`` and ``where``."""
    if not isinstance(entry, dict):
        raise _table_error(path, where, f"must be an object with block_m, stage1, stage2, got {type(entry).__name__}")
    unknown = sorted(set(entry) - {"block_m", "stage1", "stage2"})
    if unknown:
        raise _table_error(path, where, f"unknown keys {unknown} (known: ['block_m', 'stage1', 'stage2'])")
    missing = [f for f in ("block_m", "stage1", "stage2") if f not in entry]
    if missing:
        raise _table_error(path, where, f"missing {missing}")
    _check_int(path, where, "block_m", entry["block_m"], power_of_two=True, minimum=16)
    for stage in ("stage1", "stage2"):
        _check_tile(path, f"{where} {stage}", entry[stage])
    if entry["stage1"].get("split_k", 1) != 1:
        raise _table_error(path, f"{where} stage1",
                           "split_k applies to stage 2 only (stage 1's activation needs all of K)")
    return MoEConfig.from_json(entry)


def check_table(path: str, data: Any) -> dict[str, dict[str, Any]]:
    """A parsed ``<arch>.json`` checked entry by entry, without its ``_``-prefixed comment keys."""
    if not isinstance(data, dict):
        raise _table_error(path, "top level", f"must be an object keyed by layer shape, got {type(data).__name__}")
    out = {}
    for shape, buckets in data.items():
        if shape.startswith("_"):
            continue
        if not _SHAPE_KEY.fullmatch(shape):
            raise _table_error(path, f"key {shape!r}", "a layer shape must read 'E=<int>,D=<int>,I=<int>,"
                               "dtype=<bfloat16|float16|float32>[,w=<weight scheme>[,a=<fp8|int8>]]'")
        if not isinstance(buckets, dict) or not buckets:
            raise _table_error(path, f"entry {shape!r}", "must be a non-empty object keyed by M bucket")
        for bucket, entry in buckets.items():
            if not re.fullmatch(r"[0-9]+", bucket):
                raise _table_error(path, f"entry {shape!r}", f"M bucket {bucket!r} is not a non-negative integer")
            config = check_entry(path, f"entry {shape!r} M bucket {bucket!r}", entry)
            if ",a=" not in shape and (config.stage1.prequant_a or config.stage2.prequant_a):
                raise _table_error(path, f"entry {shape!r} M bucket {bucket!r}",
                                   "prequant_a applies to layers with act_quant only (a shape key with ',a=')")
        out[shape] = buckets
    return out


@functools.cache
def _parse(path: str, stamp: tuple[int, int]) -> dict[str, dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"jaxmoe config table {path}: not valid JSON: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"jaxmoe config table {path}: cannot be read: {err}") from None
    return check_table(path, data)


def _load(path: str) -> dict[str, dict[str, Any]]:
    """The checked table at ``path`` ({} if there is none), re-read when the file changes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return {}
    return _parse(path, (st.st_mtime_ns, st.st_size))


_load.cache_clear = _parse.cache_clear  # type: ignore[attr-defined]


def log_configs() -> bool:
    """``JAXMOE_LOG_CONFIG`` set to anything but empty or ``0``: print each config picked."""
    return os.environ.get("JAXMOE_LOG_CONFIG", "").strip() not in ("", "0")


def tables_naming(key: str, arch: str, device: str | None) -> Iterator[tuple[pathlib.Path, dict[str, Any]]]:
    """The tables (:func:`config_dirs`, :func:`table_names`, in lookup order) that name the
    layer shape ``key``, each with the shape's entries keyed by M bucket."""
    for path in (directory / name for directory in config_dirs() for name in table_names(arch, device)):
        table = _load(str(path)).get(key)
        if table:
            yield path, table


def find_entry(key: str, arch: str, device: str | None) -> tuple[pathlib.Path, dict[str, Any]] | None:
    """The first table that names the layer shape ``key`` (:func:`tables_naming`), or None."""
    return next(tables_naming(key, arch, device), None)


def select_config(num_tokens: int, top_k: int, num_experts: int, hidden: int, intermediate: int,
                  dtype: Any, arch: str = "sm90", weights: str = "none", act_quant: str | None = None,
                  device: str | None = CURRENT_DEVICE) -> MoEConfig:
    """The tuned config for this shape, weight scheme, activation quantization and M from
    the first table with an entry for them at or below M (see :func:`config_dirs` and
    :func:`table_names`;
    ``device``: the GPU model whose own tables come first, by default that of the default
    platform, :func:`current_device`), else the heuristic; its K tiles fitted to the
    schemes (:func:`fit_scheme`). With ``JAXMOE_FP8_FAST_ACCUM=1`` the layers it applies to
    (:func:`fast_accum_applies`) take the heuristic: the tables hold tiles tuned for the
    default accumulation (two fp32 tiles), and ``tune`` refuses to run with it set."""
    key = shape_key(num_experts, hidden, intermediate, dtype, weights, act_quant)
    if device is CURRENT_DEVICE:
        device = current_device(arch)
    fast = fast_accum_applies(weights, act_quant)
    source = f"heuristic: {FAST_ACCUM_ENV}=1 reads no table" if fast else "heuristic"
    config = None
    for path, table in ([] if fast else tables_naming(key, arch, device)):
        # a bucket holds from its M up to the next bucket; below a table's smallest bucket
        # the table says nothing (a partly tuned table), and the next table is asked
        buckets = {int(m): entry for m, entry in table.items()}
        below = [m for m in sorted(buckets) if m <= num_tokens]
        if below:
            config = MoEConfig.from_json(buckets[below[-1]])
            source = f"{path} M<={below[-1]}"
            break
    if config is None:
        config = heuristic_config(num_tokens, top_k, num_experts, hidden, intermediate, dtype, arch, weights,
                                  act_quant)
    elif weights != "none" or act_quant is not None:
        config = MoEConfig(config.block_m, fit_scheme(config.stage1, weights, act_quant),
                           fit_scheme(config.stage2, weights, act_quant))
    if log_configs():
        print(f"jaxmoe: M={num_tokens} k={top_k} {key} "
              f"arch={arch} [{source}] {config}", file=sys.stderr)
    return config
