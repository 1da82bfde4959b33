"""Alternate two jaxmoe source trees (or one tree under two environments) on the same bench
cells, to compare their speed.

    python bench/ab.py --a OLD_TREE --b NEW_TREE --model qwen3-30b-a3b --m 1 --m 1024 [--rounds 2] [--reps 10]
                       [--quant int8 [--act-quant int8]]
    python bench/ab.py --a . --b . --a-env JAXMOE_TMA=0 --b-env JAXMOE_TMA=1 --model mixtral-8x7b --m 4096

Each round runs ``python -m jaxmoe bench --impl jaxmoe`` once per tree (A then B, then B
then A in the next round, so neither side always runs first), each in its own process
with that tree first on ``PYTHONPATH`` and that side's ``--a-env`` / ``--b-env`` variables
set (repeatable ``NAME=VALUE``); the table gives each side's median time per
layer over the rounds and B / A. Differences smaller than the spread between rounds are
noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def parse_env(items: list[str] | None) -> dict[str, str]:
    """``NAME=VALUE`` items as a dict; a malformed item raises ``SystemExit`` naming it."""
    env = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not name.replace("_", "").isalnum():
            raise SystemExit(f"ab.py: environment setting {item!r} is not NAME=VALUE")
        env[name] = value
    return env


def run_side(tree: str, models: list[str], ms: list[int], reps: int, out: str, quant: list[str],
             extra_env: dict[str, str] | None = None) -> dict[tuple[str, int], float]:
    cmd = [sys.executable, "-m", "jaxmoe", "bench", "--impl", "jaxmoe", "--reps", str(reps), "--out", out, *quant]
    for model in models:
        cmd += ["--model", model]
    for m in ms:
        cmd += ["--m", str(m)]
    env = dict(os.environ, **(extra_env or {}))
    env["PYTHONPATH"] = os.path.abspath(tree) + os.pathsep + os.environ.get("PYTHONPATH", "")
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(out + ".json") as f:
        rows = json.load(f)
    # with a weight scheme the bench also times bf16 experts: keep the quantized layer's rows
    return {(r["model"], r["M"]): r["time_ms"] for r in rows
            if r["time_ms"] and (not quant or r["impl"].startswith("jaxmoe:"))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", required=True, help="source tree A (holds jaxmoe/)")
    p.add_argument("--b", required=True, help="source tree B")
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--m", type=int, action="append", required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default=None, help="write the table as JSON here")
    p.add_argument("--quant", default=None, help="weight scheme, passed to the bench (quantized experts)")
    p.add_argument("--act-quant", default=None, help="activation quantization, passed to the bench")
    p.add_argument("--a-env", action="append", metavar="NAME=VALUE", help="set for side A's runs (repeatable)")
    p.add_argument("--b-env", action="append", metavar="NAME=VALUE", help="set for side B's runs (repeatable)")
    args = p.parse_args(argv)
    envs = {"A": parse_env(args.a_env), "B": parse_env(args.b_env)}
    if os.path.abspath(args.a) == os.path.abspath(args.b) and envs["A"] == envs["B"]:
        raise SystemExit("ab.py: sides A and B are the same tree with the same environment")
    quant = ["--quant", args.quant] if args.quant else []
    quant += ["--act-quant", args.act_quant] if args.act_quant else []
    times: dict[str, dict[tuple[str, int], list[float]]] = {"A": {}, "B": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = (("A", args.a), ("B", args.b)) if r % 2 == 0 else (("B", args.b), ("A", args.a))
            for side, tree in order:
                res = run_side(tree, args.model, args.m, args.reps, os.path.join(tmp, f"{side}{r}"), quant,
                               envs[side])
                for cell, t in res.items():
                    times[side].setdefault(cell, []).append(t)
                print(f"round {r} {side}: " + ", ".join(f"{c[0]} M={c[1]} {t:.4f} ms" for c, t in res.items()),
                      file=sys.stderr, flush=True)
    rows = []
    for side, tree in (("A", args.a), ("B", args.b)):
        print(f"{side}: {tree}" + "".join(f" {k}={v}" for k, v in envs[side].items()))
    print(f"{'model':<16}{'M':>6}{'A ms':>10}{'B ms':>10}{'B/A':>8}  spread A, B (max/min over rounds)")
    for cell in sorted(times["A"], key=lambda c: (c[0], c[1])):
        a, b = times["A"][cell], times["B"].get(cell, [])
        if not b:
            continue
        ma, mb = statistics.median(a), statistics.median(b)
        rows.append({"model": cell[0], "M": cell[1], "a_ms": a, "b_ms": b, "ratio": mb / ma})
        print(f"{cell[0]:<16}{cell[1]:>6}{ma:>10.4f}{mb:>10.4f}{mb / ma:>8.3f}  "
              f"{max(a) / min(a):.3f}, {max(b) / min(b):.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
