"""Block configurations of the MoE GEMMs: a heuristic, overridden by tuned JSON per arch.

A :class:`MoEConfig` fixes BLOCK_M (shared by the alignment and both GEMM stages, since
they walk the same padded blocks) and one :class:`GemmTile` per stage. Tuned files live in
``jaxmoe/configs/<arch>.json``::

    {"E=8,D=4096,I=14336,dtype=bfloat16": {"1": {"block_m": 16, "stage1": {...}, "stage2": {...}}, "64": ...}}

keyed by the layer shape and then by M buckets (the entry with the largest bucket <= M is
used). ``JAXMOE_CONFIG_DIR`` points at another directory of such files (what ``tune``
writes); ``JAXMOE_LOG_CONFIG=1`` prints the config each call picks.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import sys
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

    def shared_bytes(self, block_m: int, itemsize: int, fused: bool) -> int:
        """Shared memory the software pipeline needs: A tile plus one (or two) B tiles per stage."""
        b_tiles = 2 if fused else 1
        return (block_m * self.block_k + b_tiles * self.block_k * self.block_n) * itemsize * self.num_stages


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """BLOCK_M plus the tiles of stage 1 (gate/up, activation fused) and stage 2 (down)."""

    block_m: int
    stage1: GemmTile
    stage2: GemmTile

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> MoEConfig:
        return MoEConfig(int(d["block_m"]), GemmTile(**d["stage1"]), GemmTile(**d["stage2"]))


def shape_key(num_experts: int, hidden: int, intermediate: int, dtype: Any) -> str:
    return f"E={num_experts},D={hidden},I={intermediate},dtype={np.dtype(dtype).name}"


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


def heuristic_config(num_tokens: int, top_k: int, num_experts: int, hidden: int, intermediate: int,
                     dtype: Any, arch: str = "sm90") -> MoEConfig:
    """A sound default from the average rows per expert; untuned shapes land here."""
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
    return MoEConfig(block_m, _fit(s1, block_m, dtype, arch, True), _fit(s2, block_m, dtype, arch, False))


# The backward's GEMM tile (stage-2 backward, stage-1 backward, dx), one per BLOCK_M, dtype
# and arch, fitted to shared memory: the backward adds few compiled kernels whatever the
# forward's tuned tiles are. Not yet tuned on a GPU.
BACKWARD_TILE = GemmTile(block_n=64, block_k=64, group_size_m=8, num_warps=4, num_stages=3)


def backward_tile(block_m: int, dtype: Any, arch: str, fused: bool) -> GemmTile:
    """The backward's tile for rows of ``block_m`` (``fused``: the stage-1 backward, two B tiles)."""
    return _fit(BACKWARD_TILE, block_m, dtype, arch, fused)


def _fit(tile: GemmTile, block_m: int, dtype: Any, arch: str, fused: bool) -> GemmTile:
    """Shrink stages, then BLOCK_K, until the tile fits the arch's shared memory."""
    itemsize = np.dtype(dtype).itemsize
    limit = SHARED_MEMORY_LIMIT[arch]
    while tile.shared_bytes(block_m, itemsize, fused) > limit:
        if tile.num_stages > 2:
            tile = dataclasses.replace(tile, num_stages=tile.num_stages - 1)
        elif tile.block_k > 32:
            tile = dataclasses.replace(tile, block_k=tile.block_k // 2)
        elif tile.block_n > 32:
            tile = dataclasses.replace(tile, block_n=tile.block_n // 2)
        else:
            break
    return tile


def config_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("JAXMOE_CONFIG_DIR", PACKAGE_CONFIGS))


@functools.cache
def _load(path: str) -> dict[str, dict[str, Any]]:
    p = pathlib.Path(path)
    if not p.exists():
        return {}
    with open(p) as f:
        data = json.load(f)
    return {k: v for k, v in data.items() if not k.startswith("_")}


def log_configs() -> bool:
    """``JAXMOE_LOG_CONFIG`` set to anything but empty or ``0``: print each config picked."""
    return os.environ.get("JAXMOE_LOG_CONFIG", "").strip() not in ("", "0")


def select_config(num_tokens: int, top_k: int, num_experts: int, hidden: int, intermediate: int,
                  dtype: Any, arch: str = "sm90") -> MoEConfig:
    """The tuned config for this shape and M if the arch's JSON has one, else the heuristic."""
    table = _load(str(config_dir() / f"{arch}.json")).get(shape_key(num_experts, hidden, intermediate, dtype))
    source = "heuristic"
    config = None
    if table:
        buckets = sorted(int(m) for m in table)
        below = [m for m in buckets if m <= num_tokens]
        bucket = below[-1] if below else buckets[0]
        config = MoEConfig.from_json(table[str(bucket)])
        source = f"{arch}.json M<={bucket}" if below else f"{arch}.json M={bucket}"
    if config is None:
        config = heuristic_config(num_tokens, top_k, num_experts, hidden, intermediate, dtype, arch)
    if log_configs():
        print(f"jaxmoe: M={num_tokens} k={top_k} {shape_key(num_experts, hidden, intermediate, dtype)} "
              f"arch={arch} [{source}] {config}", file=sys.stderr)
    return config
