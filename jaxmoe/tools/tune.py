"""``python -m jaxmoe tune``: search block configs of ``fused_moe`` on the current GPU.

For each layer shape (``--model`` presets, ``--shape E,k,D,I``, ``--config`` Hugging Face
model configs) and each M it times ``fused_moe`` (align + both GEMM stages + combine,
routing excluded) with every candidate :class:`~jaxmoe.ops.gemm.config.MoEConfig`, keeps
the fastest, and merges the winners into ``<out>/<arch>-<device>.json``, the table of this
GPU model (``sm90-NVIDIA_H200.json``; ``--arch-table``: ``<out>/<arch>.json``, read on every
GPU of the arch that has no table of its own). By default ``<out>`` is
``$JAXMOE_CONFIG_DIR`` if set, else the user config directory (``$XDG_CONFIG_HOME/jaxmoe``
or ``~/.config/jaxmoe``): both are read by ``select_config`` before the package's own
tables (see :mod:`jaxmoe.ops.gemm.config`). The config the tables pick today is always
among the candidates, and the fastest other candidate replaces it only if, timed again
against it in alternation, every one of its timings beats every one of the pick's.

Several processes may tune side by side on one card (one model each, say) with the same
``--lock FILE``: each compiles on its own and holds the lock while it times and while it
merges a winner into the table, so no two timings overlap and no winner is lost. A
candidate that runs out of device memory (the card's memory is shared with the other
processes) is timed once more after the other candidates.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxmoe import reference
from jaxmoe.layer import init_moe_params
from jaxmoe.models import PRESETS, ModelPreset, from_hf_config
from jaxmoe.ops.gemm import config as _config
from jaxmoe.ops.gemm.config import GemmTile, MoEConfig
from jaxmoe.ops.moe import triton as moe_triton
from jaxmoe.tools import CommandError, positive_int
from jaxmoe.tools.bench import DTYPES, card_lock, time_layer_detail

DEFAULT_M = (1, 16, 128, 1024, 4096)
CONFIRM_ROUNDS = 4  # times the winner and today's pick are timed again, alternately

TILES = (  # (block_n, block_k, group_size_m, num_warps, num_stages)
    (16, 128, 1, 4, 4),
    (16, 256, 1, 4, 3),
    (32, 128, 1, 4, 4),
    (32, 256, 1, 4, 3),
    (64, 256, 1, 4, 3),
    (64, 128, 1, 4, 5),
    (128, 128, 1, 4, 4),
    (64, 128, 1, 4, 4),
    (64, 64, 8, 4, 4),
    (128, 64, 8, 4, 4),
    (128, 64, 8, 8, 3),
    (128, 128, 8, 8, 3),
    (256, 64, 8, 8, 3),
)
# stage-2 tiles as wide as an 8-warp stage 1's accumulator (gate and up), tried with each
# 8-warp stage-1 tile: the shared tile list cannot reach them, since a 256-column stage 1
# does not fit the registers
WIDE_STAGE2 = (_config.WIDE_STAGE2, dataclasses.replace(_config.WIDE_STAGE2, num_stages=3))
SPLIT_K_TRIES = (1, 2, 4, 8)  # stage 2's K splits tried at decode sizes


def candidates(m: int, top_k: int, experts: int, hidden: int, inter: int, dtype: Any, arch: str,
               weights: str = "none", act_quant: str | None = None,
               current: MoEConfig | None = None) -> list[MoEConfig]:
    """``current`` (the config the tables pick today, when given), the heuristic's pick, then
    BLOCK_M from the heuristic's pick and its neighbours times the tile list, fitted to
    shared memory and, for quantized weights, to the schemes' K tiles (``fit_scheme``);
    at decode sizes (BLOCK_M <= 32, no ``act_quant``) also the heuristic's pick with its
    stage 2 split along K in ``SPLIT_K_TRIES`` ways. With ``act_quant`` the tile list
    rounds A as the heuristic's pick does (``prequant_a``), and the pick is also tried
    the other way. On sm_90 each of those picks is also tried with B read by TMA (``tma``)."""
    base = _config.heuristic_config(m, top_k, experts, hidden, inter, dtype, arch, weights, act_quant)
    b_itemsize = None if weights == "none" else 1

    def fit(tile: GemmTile, block_m: int, fused: bool) -> GemmTile:
        tile = dataclasses.replace(tile, prequant_a=(base.stage1 if fused else base.stage2).prequant_a)
        tile = _config.fit_scheme(tile, weights, act_quant)
        return _config._fit(tile, block_m, dtype, arch, fused, b_itemsize, weights, act_quant)

    block_ms = sorted({b for b in (base.block_m // 2, base.block_m, base.block_m * 2) if 16 <= b <= 128})
    out = [current] if current is not None else []
    if base not in out:
        out.append(base)
    if act_quant is not None:  # A rounded before each GEMM, or in each program's tiles
        flipped = MoEConfig(base.block_m,
                            *(_config._fit(dataclasses.replace(t, prequant_a=not t.prequant_a), base.block_m, dtype,
                                           arch, fused, b_itemsize, weights, act_quant)
                              for t, fused in ((base.stage1, True), (base.stage2, False))))
        if flipped not in out:
            out.append(flipped)
    if base.block_m <= 32 and act_quant is None:
        for split in SPLIT_K_TRIES:
            if inter // split >= base.stage2.block_k:
                config = dataclasses.replace(base, stage2=dataclasses.replace(base.stage2, split_k=split))
                if config not in out:
                    out.append(config)
    if arch == "sm90":  # B by TMA (where the views allow it) for the picks the tables or the heuristic make
        for config in list(out):
            with_tma = MoEConfig(config.block_m, dataclasses.replace(config.stage1, tma=True),
                                 dataclasses.replace(config.stage2, tma=True))
            if with_tma not in out:
                out.append(with_tma)
    for block_m in block_ms:
        for t in TILES:
            tile = GemmTile(*t)
            config = MoEConfig(block_m, fit(tile, block_m, True), fit(tile, block_m, False))
            if config not in out:
                out.append(config)
            if block_m == 128 and tile.num_warps == 8:
                for wide in WIDE_STAGE2:
                    paired = dataclasses.replace(config, stage2=fit(wide, block_m, False))
                    if paired not in out:
                        out.append(paired)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", choices=sorted(PRESETS), help="a preset layer shape (repeatable)")
    p.add_argument("--shape", action="append", metavar="E,k,D,I",
                   help="a layer shape: experts, experts per token, hidden size, intermediate size (repeatable)")
    p.add_argument("--config", action="append", metavar="CONFIG_JSON",
                   help="a Hugging Face model config.json whose MoE layer to tune (repeatable)")
    p.add_argument("--m", type=positive_int, action="append", help="M values to tune (default 1 16 128 1024 4096)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--reps", type=positive_int, default=10)
    p.add_argument("--quant", choices=("fp8", "fp8_tensor", "fp8_block", "int8", "int4", "int4_zp", "mxfp4"),
                   default=None, help="tune the layer with w1/w2 quantized to this scheme (its own table entries)")
    p.add_argument("--act-quant", choices=("fp8", "int8"), default=None, help="with --quant: w8a8")
    p.add_argument("--out", default=None,
                   help="directory of the tables (default: $JAXMOE_CONFIG_DIR if set, else the user config "
                        "directory, $XDG_CONFIG_HOME/jaxmoe or ~/.config/jaxmoe)")
    p.add_argument("--arch-table", action="store_true",
                   help="write <arch>.json, read on every GPU of the arch without a table of its own "
                        "(default: <arch>-<device>.json, this GPU model's)")
    p.add_argument("--lock", default=None, metavar="FILE",
                   help="an flock held while timing and while writing the table: processes that share "
                        "the card and the table compile side by side and time one at a time")
    p.add_argument("--seed-heuristic", choices=_config.ARCHS, metavar="ARCH",
                   help="write the heuristic's configs for ARCH, marked untuned, without timing anything "
                        "(no GPU needed): a starting table for a GPU that has not been tuned yet")


def parse_shape(text: str) -> ModelPreset:
    """``"E,k,D,I"`` as a softmax-routed :class:`ModelPreset`; :class:`CommandError` if malformed."""
    parts = [p.strip() for p in text.split(",")]
    try:
        e, k, d, i = (int(p) for p in parts)
    except ValueError:
        raise CommandError(f"--shape {text!r}: expected four integers E,k,D,I "
                           "(experts, experts per token, hidden size, intermediate size)") from None
    if min(e, k, d, i) < 1 or k > e:
        raise CommandError(f"--shape {text!r}: need E, k, D, I >= 1 and k <= E")
    return ModelPreset(f"E={e},k={k},D={d},I={i}", experts=e, top_k=k, hidden=d, intermediate=i)


def layers(args: argparse.Namespace) -> list[ModelPreset]:
    """The layer shapes named by ``--model``, ``--shape`` and ``--config``, in that order."""
    presets = [PRESETS[name] for name in args.model or ()]
    presets += [parse_shape(text) for text in args.shape or ()]
    for path in args.config or ():
        try:
            presets.append(from_hf_config(path))
        except ValueError as err:
            raise CommandError(f"--config {err}") from None
    if not presets:
        raise CommandError("name the layers to tune with --model, --shape E,k,D,I or --config config.json")
    return presets


def seed_heuristic(arch: str, models: Sequence[str | ModelPreset], ms: tuple[int, ...], dtype: Any,
                   path: pathlib.Path) -> None:
    """Write the heuristic's pick for each model (a preset or its name) and M into ``path``, marked untuned."""
    table: dict[str, Any] = _read_table(path)
    table["_comment"] = (f"UNTUNED: seeded from the heuristic by `python -m jaxmoe tune --seed-heuristic {arch}`; "
                         "run `python -m jaxmoe tune` on the GPU to replace it")
    for model in models:
        p = PRESETS[model] if isinstance(model, str) else model
        entry = table.setdefault(_config.shape_key(p.experts, p.hidden, p.intermediate, dtype), {})
        for m in ms:
            entry[str(m)] = _config.heuristic_config(m, p.top_k, p.experts, p.hidden, p.intermediate, dtype,
                                                     arch).to_json()
    _write_table(path, table)
    print(f"wrote {path}")


def _out_of_memory(exc: Exception) -> bool:
    """Whether ``exc`` is the card running out of memory (XLA's RESOURCE_EXHAUSTED)."""
    text = str(exc)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _read_table(path: pathlib.Path) -> dict[str, Any]:
    """The table already at ``path`` (checked: a malformed one is reported, not overwritten)."""
    if not path.exists():
        return {}
    try:
        _config._load(str(path))
    except ValueError as err:
        raise CommandError(f"{err}; fix or remove it first") from None
    return json.loads(path.read_text())


def _disagreement(params: dict[str, Any], x: jax.Array, weights: jax.Array, ids: jax.Array, config: MoEConfig,
                  reference_config: MoEConfig, act_quant: str | None) -> str | None:
    """Why ``fused_moe`` with ``config`` is not the same layer as with ``reference_config``
    (another tile order of the same fp32 sums: they agree to bf16 rounding), or None."""
    ys = [moe_triton.fused_moe(x, params["w1"], params["w2"], weights, ids, config=c, act_quant=act_quant)
          .astype(jnp.float32) for c in (config, reference_config)]
    if not bool(jnp.isfinite(ys[0]).all()):
        return "non-finite output"
    err = float(jnp.max(jnp.abs(ys[0] - ys[1])) / jnp.maximum(jnp.max(jnp.abs(ys[1])), 1e-30))
    return None if err <= 2e-2 else f"max error {err:.3g} of the output's largest value"


def _merge_entry(path: pathlib.Path, key: str, m: int, config: MoEConfig, comment: str,
                 seed: dict[str, Any] | None = None) -> None:
    """Put ``config`` in ``path``'s table under ``key`` and bucket ``m``, re-reading the file
    first (other processes may have written their winners since).

    A shape new to the table starts from ``seed`` (its entries in the table read for it
    until now), so that its other M buckets keep their configs instead of falling to the
    nearest tuned bucket; the buckets so carried over, and not tuned into this table, are
    listed under the table's ``_carried`` key until they are."""
    table = _read_table(path)
    table.setdefault("_comment", comment)
    if key not in table and seed:
        table[key] = json.loads(json.dumps(seed))
        table.setdefault("_carried", {})[key] = sorted(seed, key=int)
    table.setdefault(key, {})[str(m)] = config.to_json()
    carried = table.get("_carried", {})
    if str(m) in carried.get(key, ()):
        carried[key].remove(str(m))
        if not carried[key]:
            del carried[key]
        if not carried:
            del table["_carried"]
    _write_table(path, table)


def _write_table(path: pathlib.Path, table: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    except OSError as err:
        raise CommandError(f"cannot write {path}: {err.strerror or err}") from None
    _config._load.cache_clear()


def run(args: argparse.Namespace) -> int:
    from jaxmoe.quantize import quantize_weights
    from jaxmoe.types import ACT_QUANT_SCHEMES

    dtype = DTYPES[args.dtype]
    quant, act_quant = args.quant, args.act_quant
    if act_quant is not None and quant not in ACT_QUANT_SCHEMES[act_quant]:
        raise CommandError(f"--act-quant {act_quant} needs --quant one of {', '.join(ACT_QUANT_SCHEMES[act_quant])}, "
                           f"got {quant}")
    if _config.fast_accum_applies(quant, act_quant):
        # the tables serve the default accumulation only (select_config reads none with it set)
        raise CommandError(f"tune with {_config.FAST_ACCUM_ENV} unset: the config tables serve fp8 w8a8 "
                           "without it (with it, layers take the heuristic's tiles and read no table)")
    presets = layers(args)
    ms = tuple(args.m or DEFAULT_M)
    out_dir = pathlib.Path(args.out) if args.out else _config.config_dir()
    if args.seed_heuristic:
        seed_heuristic(args.seed_heuristic, presets, ms, dtype, out_dir / f"{args.seed_heuristic}.json")
        return 0
    if jax.default_backend() == "cpu":
        print("tune needs a GPU: it times real kernel launches (--seed-heuristic ARCH needs none)", file=sys.stderr)
        return 2
    arch = moe_triton.current_arch()
    device = _config.current_device(arch)
    if device is None and not args.arch_table:
        raise CommandError("the GPU model is not known here: pass --arch-table to write the arch's table")
    path = out_dir / _config.table_names(arch, None if args.arch_table else device)[0]
    comment = f"tuned by `python -m jaxmoe tune` on {jax.devices()[0].device_kind}"
    with card_lock(args.lock):
        _read_table(path)  # a malformed table is reported before any timing, not overwritten
    for p in presets:
        name = p.name
        params = init_moe_params(jax.random.key(0), hidden=p.hidden, intermediate=p.intermediate,
                                 experts=p.experts, dtype=dtype)
        if quant is not None:
            params = {**params, "w1": quantize_weights(params["w1"], quant), "w2": quantize_weights(params["w2"], quant)}
        routing = p.routing_kwargs(jax.random.key(1))
        key = _config.shape_key(p.experts, p.hidden, p.intermediate, dtype, quant or "none", act_quant)
        found = _config.find_entry(key, arch, device)
        seed = found[1] if found is not None else None  # today's entries: the starting point of a new shape
        for m in ms:
            xs = jax.random.normal(jax.random.key(m), (4, m, p.hidden), jnp.float32).astype(dtype)
            logits = jnp.dot(xs[0], params["router"], preferred_element_type=jnp.float32)
            weights, ids = reference.route(logits, **routing)
            current = _config.select_config(m, p.top_k, p.experts, p.hidden, p.intermediate, dtype, arch,
                                            quant or "none", act_quant)

            def layer_with(c: MoEConfig):
                return lambda prm, x: moe_triton.fused_moe(x, prm["w1"], prm["w2"], weights, ids, config=c,
                                                          act_quant=act_quant)

            def timed(c: MoEConfig) -> float:
                return time_layer_detail(layer_with(c), params, xs, args.reps, lock=card_lock(args.lock))[0]

            timings: list[tuple[float, MoEConfig]] = []
            out_of_memory: list[MoEConfig] = []

            def attempt(config: MoEConfig, again: bool = False) -> None:
                try:
                    t = timed(config)
                except Exception as exc:  # a config the compiler or the card refuses
                    if not again and _out_of_memory(exc):  # other processes may hold that memory now
                        out_of_memory.append(config)
                    why = (str(exc).strip().splitlines() or [""])[0][:160]
                    print(f"  {name} M={m} {config}: failed{' again' if again else ''} ({type(exc).__name__}: {why})",
                          file=sys.stderr)
                    return
                mark = " (current)" if config == current else ""
                print(f"  {name} M={m} {t * 1e3:8.4f} ms{mark}  {config}", file=sys.stderr, flush=True)
                timings.append((t, config))

            for config in candidates(m, p.top_k, p.experts, p.hidden, p.intermediate, dtype, arch, quant or "none",
                                     act_quant, current=current):
                attempt(config)
            if out_of_memory:  # once more, after the others: the card's memory is shared with other processes
                print(f"  {name} M={m}: timed again, having run out of memory: {len(out_of_memory)}",
                      file=sys.stderr, flush=True)
                for config in out_of_memory:
                    attempt(config, again=True)
            if not timings:
                continue
            best = min(timings, key=lambda timing: timing[0])
            winner = best[1]
            if winner != current:
                # The fastest of many noisy timings is biased low: the winner and today's
                # pick are timed again, alternately, and the winner kept only if every one of
                # its timings beats every one of today's pick (a gain larger than the spread).
                again: dict[MoEConfig, list[float]] = {c: [] for c in (winner, current)}
                for _ in range(CONFIRM_ROUNDS):
                    for c in again:
                        try:
                            again[c].append(timed(c))
                        except Exception as exc:  # e.g. today's pick from a table of another version
                            print(f"  {name} M={m} {c}: failed ({type(exc).__name__})", file=sys.stderr)
                            again[c].append(float("inf"))
                t_win, t_cur = (statistics.median(again[c]) for c in (winner, current))
                spread = (f"{min(again[winner]) * 1e3:.4f}-{max(again[winner]) * 1e3:.4f} ms against "
                          f"{min(again[current]) * 1e3:.4f}-{max(again[current]) * 1e3:.4f} ms")
                if max(again[winner]) >= min(again[current]):
                    print(f"{name} M={m}: kept {current} ({t_cur * 1e3:.4f} ms; {winner} timed "
                          f"{t_win * 1e3:.4f} ms again, {spread}: not beyond the spread)", flush=True)
                    winner = current
                else:
                    with card_lock(args.lock):  # runs on the card: not beside another's timing
                        mismatch = _disagreement(params, xs[0], weights, ids, winner, current, act_quant)
                    if mismatch is not None:
                        print(f"{name} M={m}: best {winner} disagrees with {current} ({mismatch}); not written",
                              flush=True)
                        continue
                    print(f"{name} M={m}: best {t_win * 1e3:.4f} ms against {t_cur * 1e3:.4f} ms for {current}, "
                          f"timed again ({spread}): {winner}", flush=True)
            else:
                print(f"{name} M={m}: kept {current} ({best[0] * 1e3:.4f} ms, the fastest)", flush=True)
            with card_lock(args.lock):
                _merge_entry(path, key, m, winner, comment, seed)
    print(f"wrote {path}")
    return 0
