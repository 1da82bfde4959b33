"""The benchmark's training mode, its device ceilings and its finiteness check (CPU: the
tiny preset, kernels through the interpreter; on a GPU the same commands time real cells)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe.__main__ import main
from jaxmoe.models import PRESETS
from jaxmoe.tools import bench, ceilings, train_bench

CPU_ONLY = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU behaviour")


@CPU_ONLY
def test_train_mode_runs_on_cpu(tmp_path, capsys):
    """Forward + backward of the tiny layer: jaxmoe's kernels (interpreter) and ragged_dot's
    autodiff in one run, rows marked train, the header naming the ceilings."""
    prefix = str(tmp_path / "train")
    assert main(["bench", "--mode", "train", "--model", "tiny", "--m", "4", "--reps", "1", "--out", prefix]) == 0
    out = capsys.readouterr().out
    assert "--mode train" in out and "ceilings: copy" in out and "[measured]" in out
    rows = json.loads((tmp_path / "train.json").read_text())
    assert {r["impl"] for r in rows} == {"jaxmoe", "ragged_dot"}  # tokamax is not installed here
    for r in rows:
        assert r["mode"] == "train" and r["status"] == "ok", r
        assert r["time_ms"] > 0 and r["efficiency"] > 0
    assert "ragged_dot" in next(r for r in rows if r["impl"] == "jaxmoe")["speedup"]


def test_train_roofline_counts_three_gemm_passes():
    p = PRESETS["mixtral-8x7b"]
    c = ceilings.Ceilings(4e12, 800e12, None, "test")
    fb, ff, _ = bench.roofline(p, 4096, 8.0, 2, c)
    tb, tf, floor = train_bench.train_roofline(p, 4096, 8.0, 2, c)
    assert tf == 3 * ff == 3 * 2 * 4096 * 2 * 3 * 14336 * 4096
    assert tb == 3 * fb
    assert floor == max(tb / 4e12, tf / 800e12) == tf / 800e12  # compute-bound at training sizes


def test_ceilings_table_and_fallback():
    h200 = ceilings.known_ceilings("NVIDIA H200")
    assert (h200.bytes_per_s, h200.bf16_flops) == (4.21e12, 798e12) and "NVIDIA H200" in h200.source
    unknown = ceilings.known_ceilings("some future card")
    assert unknown is ceilings.FALLBACK and "fallback" in unknown.describe()


@CPU_ONLY
def test_ceilings_are_measured_here():
    c = ceilings.measure_ceilings(small=True, reps=3)
    assert c.source == "measured" and c.bytes_per_s > 0 and c.bf16_flops > 0 and c.fp8_flops is None


@CPU_ONLY
def test_ceilings_fall_back_to_the_table_when_the_probe_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(ceilings, "copy_rate", broken)
    assert ceilings.measure_ceilings(small=True) == ceilings.known_ceilings(jax.devices()[0].device_kind)


def test_check_finite_finds_inf_and_nan():
    bench.check_finite({"a": jnp.ones(3), "ids": jnp.arange(3)})
    for bad in (jnp.inf, jnp.nan):
        with pytest.raises(bench.NonFiniteError):
            bench.check_finite({"a": jnp.ones(3), "b": jnp.ones((2, 2), jnp.bfloat16).at[1, 0].set(bad)})


@CPU_ONLY
def test_forward_bench_discards_the_time_of_overflowed_data(monkeypatch):
    """A layer whose chain overflows gets no time, only a 'non-finite' status."""
    p = PRESETS["tiny"]
    real = bench._layer_fn

    def overflowing(impl, preset, routing):
        fn = real(impl, preset, routing)
        return lambda params, x: fn(params, x) * jnp.asarray(1e38, x.dtype) * 10

    monkeypatch.setattr(bench, "_layer_fn", overflowing)
    rows = bench.bench_model(p, [2], ["ragged_dot"], jnp.float32, 1, lambda msg: None)
    assert rows[0].time_ms is None and rows[0].status.startswith("non-finite"), rows[0]


@CPU_ONLY
def test_train_step_discards_non_finite_gradients():
    p = PRESETS["tiny"]
    params = {k: v.astype(jnp.float32) for k, v in bench.init_moe_params(
        jax.random.key(0), hidden=p.hidden, intermediate=p.intermediate, experts=p.experts).items()}
    routing = p.routing_kwargs()
    step = train_bench.train_step("reference", routing)
    xs = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, p.hidden)), jnp.float32)
    cs = jnp.ones_like(xs).at[1, 0, 0].set(jnp.inf)
    t, out = train_bench.time_step(step, params, xs[:1], cs[:1], 1)  # finite data: a time
    assert t > 0 and np.isfinite(float(out[0]))
    with pytest.raises(bench.NonFiniteError):
        train_bench.time_step(step, params, xs[1:], cs[1:], 1)


@CPU_ONLY
def test_tokamax_requested_without_tokamax_is_reported(tmp_path, capsys):
    if bench.tokamax_ragged_dot() is not None:
        pytest.skip("tokamax is installed here")
    assert main(["bench", "--model", "tiny", "--m", "2", "--reps", "1", "--impl", "tokamax,ragged_dot",
                 "--ceilings", "table", "--out", str(tmp_path / "b")]) == 0
    rows = {r["impl"]: r for r in json.loads((tmp_path / "b.json").read_text())}
    assert rows["tokamax"]["status"] == "not installed" and rows["tokamax"]["time_ms"] is None
    assert rows["ragged_dot"]["status"] == "ok"


@pytest.mark.gpu
def test_train_bench_cell_on_the_gpu(tmp_path):
    """One real cell (Qwen3-30B-A3B at M = 4096): jaxmoe and the peers time finite steps,
    the ceilings are measured on this card, and the breakdown names jaxmoe's kernels."""
    prefix = str(tmp_path / "t")
    assert main(["bench", "--mode", "train", "--model", "qwen3-30b-a3b", "--m", "4096", "--reps", "3",
                 "--out", prefix]) == 0
    rows = {r["impl"]: r for r in json.loads((tmp_path / "t.json").read_text())}
    assert rows["jaxmoe"]["status"] == "ok" and rows["jaxmoe"]["efficiency"] > 0
    assert rows["ragged_dot"]["status"] in ("ok", "out of memory")


def test_breakdown_sums_kernels_and_finds_idle_gaps():
    """The breakdown of one run's device events: the span, the busy time and the kernels
    per call, and the stretches where nothing ran (an event inside another's span is no
    gap), longest first, each with the kernels either side."""
    from jaxmoe.tools import timeline

    us = 1000  # events are in ns
    run = [(0, 10 * us, "a"), (12 * us, 4 * us, "b"), (13 * us, 2 * us, "c"), (40 * us, 5 * us, "a"),
           (46 * us, 4 * us, "d")]
    span, busy, kernels, gaps = timeline.summarize(run, per_call=2)
    assert span == 25.0 and busy == 12.5
    assert kernels == [("a", 7.5, 1.0), ("b", 2.0, 0.5), ("d", 2.0, 0.5), ("c", 1.0, 0.5)]
    assert gaps == [(24.0, "b", "a"), (2.0, "a", "b"), (1.0, "a", "d")]
    text = timeline.format_breakdown("cell", (span, busy, kernels, gaps))
    assert "idle      24.0 us between b and a" in text and "kernels busy      12.5 us" in text


@pytest.mark.gpu
def test_breakdown_names_the_backward_kernels(capsys):
    from jaxmoe.tools import timeline

    p = PRESETS["mixtral-8x7b"]
    params = bench.init_moe_params(jax.random.key(0), hidden=p.hidden, intermediate=p.intermediate,
                                   experts=p.experts)
    step = train_bench.train_step("jaxmoe", p.routing_kwargs())
    x = jax.random.normal(jax.random.key(1), (1024, p.hidden), jnp.bfloat16)
    c = jnp.ones((1024, p.hidden), jnp.float32)
    result = timeline.kernel_breakdown(lambda: step(params, x, c))
    assert result is not None
    names = " ".join(name for name, _, _ in result[2])
    for kernel in ("moe_gemm_kernel", "moe_gemm_act_bwd_kernel", "moe_weight_grad_kernel"):
        assert kernel in names, names
