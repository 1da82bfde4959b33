"""`python -m jaxmoe check` and friends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jaxmoe.backends.platform import triton_available
from jaxmoe.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "jaxmoe", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)


def _row(out: str, impl: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(impl + " "))


def test_check_tiny_reference_as_a_module():
    proc = _run("check", "--model", "tiny", "--impl", "reference")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "implementation" in proc.stdout and "rel err" in proc.stdout
    assert _row(proc.stdout, "reference").rstrip().endswith("pass")


@pytest.mark.slow
def test_check_tiny_all_implementations():
    """The default run: the reference and, where available, the Triton kernels (interpreted on a CPU)."""
    proc = _run("check", "--model", "tiny", "--m", "4", "--repeats", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _row(proc.stdout, "reference").rstrip().endswith("pass")
    if triton_available():
        assert _row(proc.stdout, "triton").rstrip().endswith("pass")


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_check_dtypes(dtype, capsys):
    assert main(["check", "--impl", "reference", "--m", "5", "--dtype", dtype]) == 0
    out = capsys.readouterr().out
    assert f"dtype={dtype}" in out and _row(out, "reference").rstrip().endswith("pass")


def test_check_scales_big_models_down_on_cpu(capsys):
    if jax.default_backend() != "cpu":
        pytest.skip("CPU behaviour")
    assert main(["check", "--model", "deepseek-v3", "--impl", "reference", "--m", "3"]) == 0
    out = capsys.readouterr().out
    assert "scaled down" in out and "E=256 k=8 D=128 I=256" in out


@pytest.mark.parametrize("quant,act_quant", [("int4_zp", None), ("fp8", "fp8"), ("int8", "int8")])
def test_check_quantized_weights(quant, act_quant, capsys):
    """--quant: the reference is the fp32 layer on the same quantized weights (so the kernels
    pass at the dtype's tolerance, w8a8 at 2e-2), and the header says what ran."""
    args = ["check", "--m", "6", "--repeats", "1", "--quant", quant] + (["--act-quant", act_quant] if act_quant else [])
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"weights={quant}" in out and f"the same {quant} weights" in out
    assert _row(out, "reference").rstrip().endswith("pass")
    if triton_available():
        assert _row(out, "triton").rstrip().endswith("pass")


def test_check_act_quant_needs_matching_weights(capsys):
    assert main(["check", "--act-quant", "int8", "--quant", "fp8"]) == 2
    assert "--act-quant int8 needs --quant one of int8, got fp8" in capsys.readouterr().err


def test_check_reports_a_raising_implementation_and_goes_on(capsys):
    assert main(["check", "--impl", "bogus,reference", "--m", "2", "--repeats", "1"]) == 1
    out = capsys.readouterr().out
    assert "ERROR ValueError" in _row(out, "bogus")
    assert _row(out, "reference").rstrip().endswith("pass")


def test_bench_runs_on_cpu(tmp_path, capsys):
    """The benchmark itself: tiny preset, kernels through the interpreter, both peers."""
    if jax.default_backend() != "cpu":
        pytest.skip("CPU behaviour")
    out_prefix = str(tmp_path / "bench")
    assert main(["bench", "--model", "tiny", "--m", "2", "--reps", "1", "--out", out_prefix]) == 0
    out = capsys.readouterr().out
    for impl in ("jaxmoe", "ragged_dot", "reference"):
        row = next(line for line in out.splitlines() if line.split()[:2] == ["tiny", impl])
        assert "failed" not in row and "out of memory" not in row, row
    assert "Time_(ms)" in out and "Bandwidth_(GB/s)" in out
    import json

    rows = json.loads((tmp_path / "bench.json").read_text())
    assert {r["impl"] for r in rows} == {"jaxmoe", "ragged_dot", "reference"}
    assert all(r["time_ms"] > 0 and 0 < r["efficiency"] for r in rows)
    assert (tmp_path / "bench.csv").exists()


def test_bench_header_names_a_forced_tma_choice(tmp_path, capsys, monkeypatch):
    """A run with ``JAXMOE_TMA`` set says so in its header (its numbers depend on it)."""
    if jax.default_backend() != "cpu":
        pytest.skip("CPU behaviour")
    monkeypatch.setenv("JAXMOE_TMA", "1")
    assert main(["bench", "--model", "tiny", "--m", "1", "--reps", "1", "--impl", "jaxmoe",
                 "--out", str(tmp_path / "forced")]) == 0
    assert "JAXMOE_TMA=1: every GEMM that can read" in capsys.readouterr().out
    monkeypatch.delenv("JAXMOE_TMA")
    assert main(["bench", "--model", "tiny", "--m", "1", "--reps", "1", "--impl", "jaxmoe",
                 "--out", str(tmp_path / "unset")]) == 0
    assert "JAXMOE_TMA" not in capsys.readouterr().out


def test_bench_reports_a_peer_whose_weights_do_not_fit_and_goes_on(tmp_path, capsys, monkeypatch):
    """ragged_dot's transposed weight copy failing (as on DeepSeek-V3 when memory is short)
    marks its cells and leaves the other implementations' cells alone."""
    if jax.default_backend() != "cpu":
        pytest.skip("CPU behaviour")
    from jaxmoe.tools import bench

    real = bench.jnp.swapaxes

    def no_room(a, *args):
        if a.ndim == 3:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 14.02GiB")
        return real(a, *args)

    monkeypatch.setattr(bench.jnp, "swapaxes", no_room)
    assert main(["bench", "--model", "tiny", "--m", "2", "--reps", "1", "--impl", "jaxmoe", "--impl",
                 "ragged_dot", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.split()[:2] == ["tiny", "ragged_dot"])
    assert "out of memory (weights in ragged_dot's layout)" in row
    ours = next(line for line in out.splitlines() if line.split()[:2] == ["tiny", "jaxmoe"])
    assert "failed" not in ours and "out of memory" not in ours


def test_tune_refuses_cpu(capsys):
    if jax.default_backend() != "cpu":
        pytest.skip("CPU behaviour")
    assert main(["tune", "--model", "tiny"]) == 2
    assert "needs a GPU" in capsys.readouterr().err


def test_tune_seeds_an_untuned_table_without_a_gpu(tmp_path):
    import json

    from jaxmoe.ops.gemm import config as _config

    assert main(["tune", "--seed-heuristic", "gfx942", "--model", "mixtral-8x7b", "--m", "1", "--m", "4096",
                 "--out", str(tmp_path)]) == 0
    table = json.loads((tmp_path / "gfx942.json").read_text())
    assert "UNTUNED" in table["_comment"]
    entry = table["E=8,D=4096,I=14336,dtype=bfloat16"]
    assert set(entry) == {"1", "4096"}
    want = _config.heuristic_config(4096, 2, 8, 4096, 14336, "bfloat16", "gfx942")
    assert _config.MoEConfig.from_json(entry["4096"]) == want


def test_tune_keeps_the_current_config_among_candidates_and_merges_winners(tmp_path):
    import json

    import jax.numpy as jnp

    from jaxmoe.ops.gemm import config as _config
    from jaxmoe.tools import tune

    current = _config.select_config(4096, 2, 8, 4096, 14336, jnp.bfloat16, "sm90")
    odd = _config.MoEConfig(32, _config.GemmTile(32, 64), _config.GemmTile(16, 64, num_stages=2))
    for cur in (current, odd):
        configs = tune.candidates(4096, 2, 8, 4096, 14336, jnp.bfloat16, "sm90", current=cur)
        assert configs[0] == cur and len(configs) == len(set(configs))
    # a winner merges into what another process wrote meanwhile; the file stays well formed
    path = tmp_path / "sm90-NVIDIA_H200.json"
    key = "E=8,D=4096,I=14336,dtype=bfloat16"
    tune._merge_entry(path, key, 1, odd, "first")
    tune._merge_entry(path, key, 4096, current, "second")
    tune._merge_entry(path, "E=128,D=2048,I=768,dtype=bfloat16", 16, odd, "third")
    table = _config._load(str(path))
    assert {m: _config.MoEConfig.from_json(e) for m, e in table[key].items()} == {"1": odd, "4096": current}
    assert set(table) == {key, "E=128,D=2048,I=768,dtype=bfloat16"}
    assert json.loads(path.read_text())["_comment"] == "first"
    # a shape new to the table starts from its entries elsewhere, listed as carried until tuned
    qwen = "E=128,D=4096,I=1536,dtype=bfloat16"
    seed = {"1": odd.to_json(), "128": odd.to_json(), "4096": odd.to_json()}
    tune._merge_entry(path, qwen, 128, current, "fourth", seed)
    raw = json.loads(path.read_text())
    assert raw["_carried"] == {qwen: ["1", "4096"]}
    assert {m: _config.MoEConfig.from_json(e) for m, e in raw[qwen].items()} == {"1": odd, "128": current,
                                                                                  "4096": odd}
    tune._merge_entry(path, qwen, 1, current, "fifth", seed)
    tune._merge_entry(path, qwen, 4096, current, "sixth", seed)
    raw = json.loads(path.read_text())
    assert "_carried" not in raw and {_config.MoEConfig.from_json(e) for e in raw[qwen].values()} == {current}
    assert seed["128"] == odd.to_json()  # the seed itself is not changed


@pytest.mark.parametrize("case", ["clear win", "within the spread", "disagrees"])
def test_tune_keeps_a_winner_only_beyond_the_spread_and_computing_the_same(case, tmp_path, monkeypatch):
    """The decision rule, with the timing and the card faked: the fastest candidate is timed
    again against today's pick and written only if all its timings beat all of the pick's,
    and only if it computes the same layer."""
    import itertools
    import json

    from jaxmoe.ops.gemm import config as _config
    from jaxmoe.tools import tune

    fast = _config.MoEConfig(16, _config.GemmTile(32, 64), _config.GemmTile(32, 64))
    slow = _config.MoEConfig(32, _config.GemmTile(64, 64), _config.GemmTile(64, 64))
    noise = itertools.cycle([0.0, 0.3e-3] if case == "within the spread" else [0.0, 0.01e-3])
    seen = []

    def fake_time(fn, params, xs, reps, lock=None, feedback=1.0):
        fn(params, xs[0])  # records the config the layer runs with, runs nothing
        base = {fast: 1.0e-3, slow: 2.0e-3}.get(seen[-1], 1.2e-3)  # today's pick: 1.2 ms
        return base + next(noise), 0.0

    monkeypatch.setattr(tune, "time_layer_detail", fake_time)
    monkeypatch.setattr(tune.moe_triton, "fused_moe", lambda *a, config=None, **kw: seen.append(config))
    monkeypatch.setattr(tune.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(_config, "current_device", lambda arch: "FAKE_GPU")
    monkeypatch.setattr(tune, "candidates", lambda *a, current=None, **kw: [current, slow, fast])
    monkeypatch.setattr(tune, "_disagreement",
                        lambda *a: "max error 0.5 of the output's largest value" if case == "disagrees" else None)
    monkeypatch.setenv("JAXMOE_CONFIG_DIR", str(tmp_path / "none"))
    assert main(["tune", "--model", "tiny", "--m", "8", "--reps", "1", "--out", str(tmp_path)]) == 0
    current = _config.select_config(8, 2, 8, 128, 256, "bfloat16", "sm90", device=None)
    table = json.loads((tmp_path / "sm90-FAKE_GPU.json").read_text()) if case != "disagrees" else None
    if case == "clear win":
        assert _config.MoEConfig.from_json(table["E=8,D=128,I=256,dtype=bfloat16"]["8"]) == fast
    elif case == "within the spread":
        assert _config.MoEConfig.from_json(table["E=8,D=128,I=256,dtype=bfloat16"]["8"]) == current
    else:
        assert not (tmp_path / "sm90-FAKE_GPU.json").exists()
    # every candidate once, then the winner and today's pick alternately
    assert seen[:3] == [current, slow, fast]
    assert seen[3:] == [fast, current] * tune.CONFIRM_ROUNDS


def test_tune_times_again_the_candidates_that_ran_out_of_memory(tmp_path, monkeypatch, capsys):
    """A candidate that runs out of device memory (another process on the card holding it)
    is timed again after the others, once; one that fails otherwise is not."""
    import json

    from jaxmoe.ops.gemm import config as _config
    from jaxmoe.tools import tune

    fast = _config.MoEConfig(16, _config.GemmTile(32, 64), _config.GemmTile(32, 64))
    slow = _config.MoEConfig(32, _config.GemmTile(64, 64), _config.GemmTile(64, 64))
    broken = _config.MoEConfig(64, _config.GemmTile(64, 64), _config.GemmTile(64, 64))
    seen = []

    def fake_time(fn, params, xs, reps, lock=None, feedback=1.0):
        fn(params, xs[0])
        if seen[-1] == fast and seen.count(fast) == 1:
            raise RuntimeError("RESOURCE_EXHAUSTED: Failed to allocate device memory of 27.37GiB")
        if seen[-1] == broken:
            raise ValueError("the compiler refuses this tile")
        return {fast: 1.0e-3, slow: 2.0e-3}.get(seen[-1], 1.2e-3), 0.0

    monkeypatch.setattr(tune, "time_layer_detail", fake_time)
    monkeypatch.setattr(tune.moe_triton, "fused_moe", lambda *a, config=None, **kw: seen.append(config))
    monkeypatch.setattr(tune.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(_config, "current_device", lambda arch: "FAKE_GPU")
    monkeypatch.setattr(tune, "candidates", lambda *a, current=None, **kw: [current, fast, broken, slow])
    monkeypatch.setattr(tune, "_disagreement", lambda *a: None)
    monkeypatch.setenv("JAXMOE_CONFIG_DIR", str(tmp_path / "none"))
    assert main(["tune", "--model", "tiny", "--m", "8", "--reps", "1", "--out", str(tmp_path)]) == 0
    current = _config.select_config(8, 2, 8, 128, 256, "bfloat16", "sm90", device=None)
    assert seen[:5] == [current, fast, broken, slow, fast]  # fast again after the others, broken not
    assert seen[5:] == [fast, current] * tune.CONFIRM_ROUNDS
    table = json.loads((tmp_path / "sm90-FAKE_GPU.json").read_text())
    assert _config.MoEConfig.from_json(table["E=8,D=128,I=256,dtype=bfloat16"]["8"]) == fast
    assert "timed again, having run out of memory: 1" in capsys.readouterr().err


@pytest.mark.gpu
def test_tune_writes_this_gpus_table(tmp_path, monkeypatch):
    """On a GPU, tune times each candidate and writes the winner into <arch>-<device>.json,
    which select_config then reads for this GPU."""
    import json

    import jax.numpy as jnp

    from jaxmoe.ops.gemm import config as _config
    from jaxmoe.ops.moe import triton as moe_triton
    from jaxmoe.tools import tune

    arch = moe_triton.current_arch()
    device = _config.current_device(arch)
    assert device
    few = [_config.MoEConfig(16, _config.GemmTile(32, 64), _config.GemmTile(32, 64)),
           _config.MoEConfig(32, _config.GemmTile(64, 64), _config.GemmTile(64, 64))]
    monkeypatch.setattr(tune, "candidates", lambda *a, **kw: few)
    monkeypatch.setenv("JAXMOE_CONFIG_DIR", str(tmp_path))
    lock = tmp_path / "card.lock"
    today = _config.select_config(8, 2, 8, 128, 256, jnp.bfloat16, arch)
    assert main(["tune", "--model", "tiny", "--m", "8", "--reps", "2", "--lock", str(lock)]) == 0
    table = json.loads((tmp_path / f"{arch}-{device}.json").read_text())
    entry = _config.MoEConfig.from_json(table["E=8,D=128,I=256,dtype=bfloat16"]["8"])
    # a candidate, or today's pick where no candidate beat it beyond the timing's spread
    assert entry in (*few, today) and device.replace("_", " ") in table["_comment"].replace("_", " ")
    assert _config.select_config(8, 2, 8, 128, 256, jnp.bfloat16, arch) == entry


def test_shipped_amd_tables_are_marked_untuned():
    import json

    from jaxmoe.ops.gemm import config as _config

    for arch in ("gfx942", "gfx950"):
        table = json.loads((_config.PACKAGE_CONFIGS / f"{arch}.json").read_text())
        assert "UNTUNED" in table["_comment"] and len(table) > 1


def test_bench_time_per_layer_excludes_the_fixed_cost_of_a_call(monkeypatch):
    """The per-layer time is the slope between a short and a long chain: a fixed cost per
    jit call (dispatch) lands in the intercept, not in the time per layer."""
    import time
    import types

    from jaxmoe.tools import bench

    fixed, per_layer = 0.030, 0.010

    def fake_chain(fn, sets, feedback=1.0):
        def call(params, xs):
            time.sleep(fixed + sets * per_layer)
            return xs

        # as a jitted chain: lowered and compiled first, then called
        return types.SimpleNamespace(lower=lambda *args: types.SimpleNamespace(compile=lambda: call))

    monkeypatch.setattr(bench, "_chain", fake_chain)
    xs = jnp.zeros((bench.SETS, 1, 4))
    t, overhead = bench.time_layer_detail(None, None, xs, reps=3)
    assert t == pytest.approx(per_layer, rel=0.25)
    assert overhead == pytest.approx(fixed, abs=0.008)
    with pytest.raises(ValueError, match="more than"):
        bench.time_layer_detail(None, None, xs[: bench.SHORT], reps=1)


def test_bench_counts_the_experts_each_chained_layer_hits():
    """The roofline's weight bytes come from each timed layer's own routing: layer 0 sees
    its batch alone, later layers the batch plus the previous layer's output."""
    import numpy as np

    from jaxmoe import reference
    from jaxmoe.tools import bench
    from jaxmoe.layer import init_moe_params
    from jaxmoe.models import PRESETS

    p = PRESETS["tiny"]
    params = init_moe_params(jax.random.key(0), hidden=p.hidden, intermediate=p.intermediate, experts=p.experts)
    routing = p.routing_kwargs(jax.random.key(1))
    xs = jax.random.normal(jax.random.key(2), (3, 5, p.hidden), jnp.float32).astype(jnp.bfloat16)
    hits = bench.experts_hit_per_layer(params, xs, routing, p.experts)
    assert len(hits) == 3 and all(1 <= h <= p.experts for h in hits)
    for s, x in enumerate([xs[0], xs[1] + reference.moe_layer(params, xs[0], **routing)]):
        _, ids = reference.route(jnp.dot(x, params["router"], preferred_element_type=jnp.float32), **routing)
        assert hits[s] == np.unique(np.asarray(ids)).size


def test_bench_counts_experts_with_the_reference_when_the_kernels_fail(monkeypatch):
    """A kernel failure must not stop the benchmark before its cells can report it."""
    from jaxmoe.tools import bench
    from jaxmoe.layer import init_moe_params
    from jaxmoe.models import PRESETS

    real = bench.moe_layer

    def kernels_broken(params, x, *, implementation=None, **kw):
        if implementation is None:
            raise RuntimeError("kernel launch failed")
        return real(params, x, implementation=implementation, **kw)

    p = PRESETS["tiny"]
    params = init_moe_params(jax.random.key(0), hidden=p.hidden, intermediate=p.intermediate, experts=p.experts)
    routing = p.routing_kwargs(jax.random.key(1))
    xs = jax.random.normal(jax.random.key(3), (3, 4, p.hidden), jnp.float32).astype(jnp.bfloat16)
    want = bench.experts_hit_per_layer(params, xs, routing, p.experts)
    monkeypatch.setattr(bench, "moe_layer", kernels_broken)
    assert bench.experts_hit_per_layer(params, xs, routing, p.experts) == want


@pytest.mark.parametrize("arch", ["sm90", "gfx942", "gfx950"])
def test_tune_candidates_all_plan(arch):
    """Every config the tuner would time can be planned on the arch (fits its shared memory),
    and on sm90 the large-M search pairs 8-warp stage-1 tiles with the wide stage-2 tiles."""
    import jax.numpy as jnp

    from jaxmoe.ops.moe import triton as moe_triton
    from jaxmoe.tools import tune

    for m in (1, 64, 1024, 4096):
        configs = tune.candidates(m, 2, 8, 4096, 14336, jnp.bfloat16, arch)
        assert len(configs) == len(set(configs)) > 1
        for config in configs:
            moe_triton.plan_fused_moe(m, 2, 8, 4096, 14336, jnp.bfloat16, arch, config=config)
    splits = {c.stage2.split_k for c in tune.candidates(1, 2, 8, 4096, 14336, jnp.bfloat16, arch, "int4")}
    assert splits == set(tune.SPLIT_K_TRIES)
    for config in tune.candidates(1, 2, 8, 4096, 14336, jnp.bfloat16, arch, "int4"):
        moe_triton.plan_fused_moe(1, 2, 8, 4096, 14336, jnp.bfloat16, arch, config=config, weights="int4")
    assert {c.stage2.split_k for c in tune.candidates(4096, 2, 8, 4096, 14336, jnp.bfloat16, arch)} == {1}
    for m, weights, act_quant in ((16, "int8", "int8"), (4096, "fp8_block", "fp8")):  # A rounded before or in-tile
        configs = tune.candidates(m, 2, 8, 4096, 14336, jnp.bfloat16, arch, weights, act_quant)
        assert {(c.stage1.prequant_a, c.stage2.prequant_a) for c in configs} == {(False, False), (True, True)}
        for config in configs:
            moe_triton.plan_fused_moe(m, 2, 8, 4096, 14336, jnp.bfloat16, arch, config=config, weights=weights,
                                      act_quant=act_quant)
    if arch == "sm90":
        for stage2 in tune.WIDE_STAGE2:
            paired = {c.stage1 for c in tune.candidates(1024, 2, 8, 4096, 14336, jnp.bfloat16, arch)
                      if c.block_m == 128 and c.stage2 == stage2}
            assert len(paired) >= 3 and all(t.num_warps == 8 for t in paired), (stage2, paired)


# ----------------------------------------------------------------------------- bad command lines


def _main_rc(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors
        return exc.code


def _bad_lines(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    not_json = tmp_path / "not.json"
    not_json.write_text("{")
    dense = tmp_path / "dense.json"
    dense.write_text('{"hidden_size": 64, "intermediate_size": 128}')
    return {
        "check --impl ,": ["check", "--impl", ","],
        "check --impl ' , '": ["check", "--impl", " , "],
        "check --m 0": ["check", "--m", "0", "--impl", "reference"],
        "check --repeats 0": ["check", "--repeats", "0"],
        "bench --m 0": ["bench", "--m", "0"],
        "bench --m -1": ["bench", "--m", "-1"],
        "bench --m x": ["bench", "--m", "x"],
        "bench --reps -3": ["bench", "--reps", "-3"],
        "bench --impl ,": ["bench", "--impl", ","],
        "bench --impl unknown": ["bench", "--impl", "jaxmoe,fast"],
        "bench --out unwritable": ["bench", "--model", "tiny", "--out", str(blocker / "bench")],
        "bench --out missing dir": ["bench", "--model", "tiny", "--out", str(tmp_path / "no" / "such" / "b")],
        "tune --m -1": ["tune", "--model", "tiny", "--m", "-1"],
        "tune --reps 0": ["tune", "--model", "tiny", "--reps", "0"],
        "tune without a layer": ["tune", "--seed-heuristic", "sm90"],
        "tune --shape three numbers": ["tune", "--shape", "8,2,64", "--seed-heuristic", "sm90"],
        "tune --shape k > E": ["tune", "--shape", "2,4,64,64", "--seed-heuristic", "sm90"],
        "tune --shape words": ["tune", "--shape", "E,k,D,I", "--seed-heuristic", "sm90"],
        "tune --config missing": ["tune", "--config", str(tmp_path / "none.json"), "--seed-heuristic", "sm90"],
        "tune --config not JSON": ["tune", "--config", str(not_json), "--seed-heuristic", "sm90"],
        "tune --config not MoE": ["tune", "--config", str(dense), "--seed-heuristic", "sm90"],
        "tune --out unwritable": ["tune", "--model", "tiny", "--seed-heuristic", "sm90", "--out", str(blocker)],
    }


BAD_LINES = [
    "check --impl ,", "check --impl ' , '", "check --m 0", "check --repeats 0", "bench --m 0", "bench --m -1",
    "bench --m x", "bench --reps -3", "bench --impl ,", "bench --impl unknown", "bench --out unwritable",
    "bench --out missing dir", "tune --m -1", "tune --reps 0", "tune without a layer", "tune --shape three numbers",
    "tune --shape k > E", "tune --shape words", "tune --config missing", "tune --config not JSON",
    "tune --config not MoE", "tune --out unwritable",
]


@pytest.mark.parametrize("case", BAD_LINES)
def test_bad_command_line_ends_in_one_line_and_a_nonzero_exit(case, tmp_path, capsys):
    argv = _bad_lines(tmp_path)[case]
    assert _main_rc(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in captured.err, captured.err
    assert "implementation" not in captured.out  # nothing was run


def test_bad_command_lines_leave_no_traceback_as_a_module(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for args in (["check", "--impl", ","], ["bench", "--out", str(blocker / "b")], ["tune", "--m", "-1"]):
        proc = _run(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_version():
    import jaxmoe

    proc = _run("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"jaxmoe {jaxmoe.__version__}", proc.stdout + proc.stderr


def test_check_impl_is_comma_separated_and_repeatable(capsys):
    assert main(["check", "--impl", " reference, ", "--impl", "reference", "--m", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert sum(line.startswith("reference ") for line in out.splitlines()) == 1


def test_bench_impl_takes_the_same_comma_separated_form(tmp_path, capsys):
    if jax.default_backend() != "cpu":
        pytest.skip("CPU behaviour")
    import json

    prefix = str(tmp_path / "b")
    assert main(["bench", "--model", "tiny", "--m", "1", "--reps", "1", "--impl", "reference,ragged_dot",
                 "--out", prefix]) == 0
    assert {r["impl"] for r in json.loads((tmp_path / "b.json").read_text())} == {"reference", "ragged_dot"}


# ----------------------------------------------------------------------------- tune: where tables go


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("JAXMOE_CONFIG_DIR", raising=False)
    return tmp_path / "xdg" / "jaxmoe"


def test_tune_writes_the_user_dir_by_default_and_the_runtime_reads_it(user_dir, capsys, monkeypatch):
    from jaxmoe.ops.gemm import config as _config

    shipped = {p.name: p.read_bytes() for p in _config.PACKAGE_CONFIGS.glob("*.json")}
    assert main(["tune", "--seed-heuristic", "sm90", "--shape", "8,2,256,512", "--m", "1", "--m", "64"]) == 0
    path = user_dir / "sm90.json"
    assert f"wrote {path}" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in _config.PACKAGE_CONFIGS.glob("*.json")} == shipped
    assert set(json_load(path)["E=8,D=256,I=512,dtype=bfloat16"]) == {"1", "64"}
    monkeypatch.setenv("JAXMOE_LOG_CONFIG", "1")
    _config.select_config(100, 2, 8, 256, 512, "bfloat16", "sm90")
    assert f"[{path} M<=64]" in capsys.readouterr().err


def test_tune_writes_jaxmoe_config_dir_when_set(user_dir, tmp_path, monkeypatch):
    env_dir = tmp_path / "env"
    monkeypatch.setenv("JAXMOE_CONFIG_DIR", str(env_dir))
    assert main(["tune", "--seed-heuristic", "gfx950", "--shape", "4,1,64,32", "--m", "8"]) == 0
    assert (env_dir / "gfx950.json").exists() and not user_dir.exists()


def test_tune_refuses_to_overwrite_a_malformed_table(user_dir, capsys):
    user_dir.mkdir(parents=True)
    (user_dir / "sm90.json").write_text("[]")
    assert main(["tune", "--seed-heuristic", "sm90", "--shape", "8,2,64,64"]) == 2
    err = capsys.readouterr().err
    assert str(user_dir / "sm90.json") in err and len(err.strip().splitlines()) == 1
    assert (user_dir / "sm90.json").read_text() == "[]"


HF_CONFIGS = {
    "mixtral": ({"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2, "hidden_size": 256,
                 "intermediate_size": 512}, (8, 2, 256, 512)),
    "qwen3_moe": ({"model_type": "qwen3_moe", "num_experts": 16, "num_experts_per_tok": 4, "hidden_size": 128,
                   "moe_intermediate_size": 64, "intermediate_size": 1024, "norm_topk_prob": True}, (16, 4, 128, 64)),
    "deepseek_v3": ({"model_type": "deepseek_v3", "n_routed_experts": 32, "num_experts_per_tok": 4,
                     "hidden_size": 128, "moe_intermediate_size": 32, "intermediate_size": 2048, "n_group": 4,
                     "topk_group": 2, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
                     "routed_scaling_factor": 2.5}, (32, 4, 128, 32)),
    "multimodal": ({"model_type": "llava", "text_config": {"num_local_experts": 4, "num_experts_per_tok": 1,
                                                           "hidden_size": 64, "intermediate_size": 96}},
                   (4, 1, 64, 96)),
}


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_tune_reads_a_hugging_face_config(name, user_dir, tmp_path):
    import json

    config, (e, k, d, i) = HF_CONFIGS[name]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert main(["tune", "--seed-heuristic", "sm90", "--config", str(path), "--m", "4"]) == 0
    table = json_load(user_dir / "sm90.json")
    from jaxmoe.ops.gemm import config as _config

    want = _config.heuristic_config(4, k, e, d, i, "bfloat16", "sm90")
    assert _config.MoEConfig.from_json(table[f"E={e},D={d},I={i},dtype=bfloat16"]["4"]) == want


def test_hugging_face_routing_fields():
    from jaxmoe.models import from_hf_config

    p = from_hf_config(HF_CONFIGS["deepseek_v3"][0])
    assert (p.scoring, p.num_expert_group, p.topk_group, p.correction_bias, p.routed_scaling_factor) == (
        "sigmoid", 4, 2, True, 2.5)
    logits = jnp.zeros((3, p.experts), jnp.float32)
    import jaxmoe

    _, ids = jaxmoe.route(logits, **p.routing_kwargs())
    assert ids.shape == (3, 4)
    m = from_hf_config(HF_CONFIGS["mixtral"][0])
    assert (m.scoring, m.num_expert_group, m.correction_bias, m.renormalize) == ("softmax", None, False, True)
    with pytest.raises(ValueError, match="topk_group"):
        from_hf_config({**HF_CONFIGS["deepseek_v3"][0], "topk_group": 9})
    with pytest.raises(ValueError, match="hidden_size"):
        from_hf_config({**HF_CONFIGS["mixtral"][0], "hidden_size": "256"})


def test_tune_takes_several_layer_sources_at_once(user_dir):
    assert main(["tune", "--seed-heuristic", "gfx942", "--model", "tiny", "--shape", "4,2,64,32", "--m", "2"]) == 0
    assert {"E=8,D=128,I=256,dtype=bfloat16", "E=4,D=64,I=32,dtype=bfloat16"} <= set(json_load(user_dir / "gfx942.json"))


def json_load(path):
    import json

    return json.loads(Path(path).read_text())


def _load_ab():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "ab.py"
    spec = importlib.util.spec_from_file_location("jaxmoe_bench_ab", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ab_alternates_one_tree_under_two_environments(tmp_path, capsys, monkeypatch):
    """bench/ab.py with --a-env / --b-env: each side's runs see its own variables (and the
    tree first on PYTHONPATH), the sides alternate, and the table gives each side's median."""
    import subprocess

    ab = _load_ab()
    seen = []

    def fake_run(cmd, cwd, env, check, stdout):
        side_tma = env.get("JAXMOE_TMA")
        seen.append((side_tma, env["PYTHONPATH"].split(os.pathsep)[0]))
        out = cmd[cmd.index("--out") + 1]
        time_ms = {"0": 2.0, "1": 1.5}[side_tma] + 0.01 * len(seen)
        with open(out + ".json", "w") as f:
            json.dump([{"model": "tiny", "M": 8, "impl": "jaxmoe", "time_ms": time_ms}], f)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(ab.subprocess, "run", fake_run)
    monkeypatch.delenv("JAXMOE_TMA", raising=False)
    out_json = tmp_path / "ab.json"
    assert ab.main(["--a", str(tmp_path), "--b", str(tmp_path), "--a-env", "JAXMOE_TMA=0", "--b-env", "JAXMOE_TMA=1",
                    "--model", "tiny", "--m", "8", "--rounds", "2", "--out", str(out_json)]) == 0
    assert [s for s, _ in seen] == ["0", "1", "1", "0"]  # A B, then B A
    assert all(p == str(tmp_path) for _, p in seen)
    [row] = json.loads(out_json.read_text())
    assert row["a_ms"] == [2.01, 2.04] and row["b_ms"] == [1.52, 1.53]
    assert abs(row["ratio"] - 1.525 / 2.025) < 1e-9
    text = capsys.readouterr().out
    assert "A: " in text and "JAXMOE_TMA=0" in text and "JAXMOE_TMA=1" in text
    for bad in (["--a-env", "JAXMOE_TMA"], ["--a-env", "=1"], []):
        with pytest.raises(SystemExit):
            ab.main(["--a", str(tmp_path), "--b", str(tmp_path), *bad, "--model", "tiny", "--m", "8"])
