"""`python -m jaxmoe check` and friends."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from jaxmoe import _dispatch
from jaxmoe.__main__ import NOT_YET, main

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
    if _dispatch.triton_ready("_moe_triton", "fused_moe"):
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


def test_check_reports_a_raising_implementation_and_goes_on(capsys):
    assert main(["check", "--impl", "bogus,reference", "--m", "2", "--repeats", "1"]) == 1
    out = capsys.readouterr().out
    assert "ERROR ValueError" in _row(out, "bogus")
    assert _row(out, "reference").rstrip().endswith("pass")


@pytest.mark.parametrize("command", ["bench", "tune"])
def test_not_yet_available(command, capsys):
    if command not in NOT_YET:
        pytest.skip(f"{command} is implemented")
    assert main([command]) == 2
    assert "not yet available" in capsys.readouterr().err
