"""Bytes one device sends in one MoE layer on a mesh, per schedule: the communication model
of ``jaxmoe.parallel.communication_bytes`` (``docs/parallel.md``) for model presets.

    python bench/comm_model.py --model mixtral-8x7b --model deepseek-v3 --m 8192 --ep 2 --ep 8 [--tp 1] [--dp 1]

For each preset, batch size M (tokens of the whole batch) and expert-parallel degree: MiB
per device per layer, forward (the backward moves as much again), for the two schedules
``moe_layer(mesh=...)`` runs (``allgather``, ``all_to_all``), the ragged all_to_all it
models, and the schedule ``schedule=None`` picks. Nothing runs on a device: this is
arithmetic, so a user can compare schedules against an interconnect's bandwidth.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax.numpy as jnp

from jaxmoe.models import PRESETS
from jaxmoe.parallel import choose_schedule, communication_bytes

COLUMNS = ("allgather", "all_to_all", "all_to_all_ragged")


def rows(models: list[str], ms: list[int], eps: list[int], tp: int, dp: int, dtype: str) -> list[dict]:
    out = []
    for name in models:
        p = PRESETS[name]
        for m in ms:
            for ep in eps:
                if p.experts % ep:
                    raise SystemExit(f"--ep {ep} does not divide {name}'s {p.experts} experts")
                costs = communication_bytes(m, p.hidden, p.top_k, p.experts, ep=ep, tp=tp, dp=dp,
                                            dtype=jnp.dtype(dtype))
                row = {"model": name, "M": m, "ep": ep, "tp": tp, "dp": dp, "dtype": dtype,
                       "chosen": choose_schedule(m, p.hidden, p.top_k, p.experts, ep=ep, tp=tp, dp=dp,
                                                 dtype=jnp.dtype(dtype))}
                row.update({f"{c}_mib": costs[c].total / 2**20 for c in COLUMNS})
                out.append(row)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", choices=sorted(PRESETS), required=True)
    parser.add_argument("--m", type=int, action="append", required=True, help="tokens of the whole batch")
    parser.add_argument("--ep", type=int, action="append", required=True, help="expert-parallel degree")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    parser.add_argument("--dp", type=int, default=1, help="data-parallel degree")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    for flag, values in (("--m", args.m), ("--ep", args.ep), ("--tp", [args.tp]), ("--dp", [args.dp])):
        if any(v < 1 for v in values):
            parser.error(f"{flag} must be positive")
    table = rows(args.model, args.m, args.ep, args.tp, args.dp, args.dtype)
    print(f"MiB sent per device per layer, forward ({args.dtype}, tp={args.tp}, dp={args.dp})")
    print(f"{'model':<16}{'M':>7}{'ep':>5}" + "".join(f"{c:>19}" for c in COLUMNS) + "  chosen")
    for r in table:
        print(f"{r['model']:<16}{r['M']:>7}{r['ep']:>5}" + "".join(f"{r[c + '_mib']:>19.1f}" for c in COLUMNS)
              + f"  {r['chosen']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(table, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
