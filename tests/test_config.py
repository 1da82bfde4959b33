"""Tuned config tables: the lookup order and a clear error for every malformed table."""

from __future__ import annotations

import copy
import dataclasses
import json

import jax.numpy as jnp
import pytest

from jaxmoe.backends.platform import normalize_device_name
from jaxmoe.models import PRESETS
from jaxmoe.ops.gemm import config as _config

SHAPE = "E=8,D=4096,I=14336,dtype=bfloat16"
TILE = {"block_n": 64, "block_k": 128, "group_size_m": 1, "num_warps": 4, "num_stages": 3}
ENTRY = {"block_m": 16, "stage1": dict(TILE), "stage2": dict(TILE)}


def _table(**changes):
    return {"_comment": "test", SHAPE: {"1": copy.deepcopy(ENTRY), **changes}}


def _bad(path_fn):
    t = _table()
    path_fn(t)
    return t


MALFORMED = {
    # name: (file text, what the message must name besides the file)
    "invalid JSON": ('{"E=8": {', "not valid JSON"),
    "list at top level": (json.dumps([ENTRY]), "top level"),
    "missing stage2": (json.dumps(_bad(lambda t: t[SHAPE]["1"].pop("stage2"))), "'stage2'"),
    "unknown entry key": (json.dumps(_bad(lambda t: t[SHAPE]["1"].update(blockm=16))), "'blockm'"),
    "unknown tile key": (json.dumps(_bad(lambda t: t[SHAPE]["1"]["stage1"].update(warps=4))), "'warps'"),
    "block_n not a power of two": (json.dumps(_bad(lambda t: t[SHAPE]["1"]["stage1"].update(block_n=96))),
                                   "block_n"),
    "block_k zero": (json.dumps(_bad(lambda t: t[SHAPE]["1"]["stage2"].update(block_k=0))), "block_k"),
    "block_m zero": (json.dumps(_bad(lambda t: t[SHAPE]["1"].update(block_m=0))), "block_m"),
    "block_m not a power of two": (json.dumps(_bad(lambda t: t[SHAPE]["1"].update(block_m=48))), "block_m"),
    "string value": (json.dumps(_bad(lambda t: t[SHAPE]["1"]["stage1"].update(num_warps="4"))), "num_warps"),
    "tma not a boolean": (json.dumps(_bad(lambda t: t[SHAPE]["1"]["stage2"].update(tma=1))), "tma"),
    "string block_m": (json.dumps(_bad(lambda t: t[SHAPE]["1"].update(block_m="16"))), "block_m"),
    "non-integer bucket": (json.dumps(_bad(lambda t: t[SHAPE].update({"1.5": copy.deepcopy(ENTRY)}))), "'1.5'"),
    "word bucket": (json.dumps(_bad(lambda t: t[SHAPE].update({"small": copy.deepcopy(ENTRY)}))), "'small'"),
    "entry not an object": (json.dumps({SHAPE: [ENTRY]}), SHAPE),
    "malformed shape key": (json.dumps({"E=8,D=4096": {"1": ENTRY}}), "E=8,D=4096"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_table_names_the_file_and_entry(name, tmp_path):
    text, what = MALFORMED[name]
    path = tmp_path / "sm90.json"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        _config._load(str(path))
    msg = str(err.value)
    assert str(path) in msg and what in msg, msg
    if name not in ("invalid JSON", "list at top level", "malformed shape key"):
        assert SHAPE in msg, msg  # the entry, by shape (and bucket where there is one)


@pytest.mark.parametrize("name", ["missing stage2", "string value", "non-integer bucket"])
def test_select_config_reports_a_malformed_table_in_the_config_dir(name, tmp_path, monkeypatch):
    text, what = MALFORMED[name]
    (tmp_path / "sm90.json").write_text(text)
    monkeypatch.setenv("JAXMOE_CONFIG_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="sm90.json") as err:
        _config.select_config(1, 2, 8, 4096, 14336, "bfloat16", "sm90")
    assert what in str(err.value)


def test_shipped_tables_are_well_formed():
    for arch in _config.ARCHS:
        table = _config._load(str(_config.PACKAGE_CONFIGS / f"{arch}.json"))
        assert table and all(_config._SHAPE_KEY.fullmatch(k) for k in table)
    device_tables = sorted(_config.PACKAGE_CONFIGS.glob("*-*.json"))
    for path in device_tables:
        arch, device = path.stem.split("-", 1)
        assert arch in _config.ARCHS and normalize_device_name(device) == device, path.name
        table = _config._load(str(path))
        assert table and all(_config._SHAPE_KEY.fullmatch(k) for k in table)


@pytest.mark.parametrize("kind,name", [("NVIDIA H200", "NVIDIA_H200"), ("NVIDIA H100 80GB HBM3", "NVIDIA_H100_80GB_HBM3"),
                                       ("AMD Instinct MI300X", "AMD_Instinct_MI300X"), (" a/b  c ", "a_b_c"),
                                       ("///", None)])
def test_device_names_for_tables(kind, name):
    assert normalize_device_name(kind) == name


def test_device_table_before_arch_table_in_each_directory(tmp_path, monkeypatch):
    env_dir, xdg = tmp_path / "env", tmp_path / "xdg"
    env_dir.mkdir()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    monkeypatch.setenv("JAXMOE_CONFIG_DIR", str(env_dir))
    assert _config.table_names("sm90", "NVIDIA_H200") == ["sm90-NVIDIA_H200.json", "sm90.json"]
    assert _config.table_names("sm90", None) == ["sm90.json"]

    def write(name, block_m, directory=env_dir):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(json.dumps({SHAPE: {"1": dict(copy.deepcopy(ENTRY), block_m=block_m)}}))

    def pick(device):
        return _config.select_config(1, 2, 8, 4096, 14336, "bfloat16", "sm90", device=device).block_m

    write("sm90.json", 32)
    write("sm90-NVIDIA_H200.json", 64)
    assert pick("NVIDIA_H200") == 64
    assert pick("NVIDIA_H100_80GB_HBM3") == 32  # no table of its own: the arch's
    assert pick(None) == 32
    # on a CPU (the interpreter plans for sm90) no device table is read by default
    assert _config.current_device("sm90") is None
    assert _config.select_config(1, 2, 8, 4096, 14336, "bfloat16", "sm90").block_m == 32
    # a directory read earlier wins, whichever of its tables names the shape
    write("sm90-NVIDIA_H200.json", 128, xdg / "jaxmoe")
    write("sm90.json", 16, xdg / "jaxmoe")
    assert pick("NVIDIA_H200") == 64
    (env_dir / "sm90-NVIDIA_H200.json").unlink()
    assert pick("NVIDIA_H200") == 32
    (env_dir / "sm90.json").unlink()
    assert pick("NVIDIA_H200") == 128
    assert pick(None) == 16
    # below a table's smallest bucket the next table answers, then the heuristic
    (env_dir / "sm90-NVIDIA_H200.json").write_text(json.dumps(
        {SHAPE: {"4096": dict(copy.deepcopy(ENTRY), block_m=64)}}))
    assert pick("NVIDIA_H200") == 128  # M = 1: the user directory's device table
    assert _config.select_config(5000, 2, 8, 4096, 14336, "bfloat16", "sm90", device="NVIDIA_H200").block_m == 64
    other = "E=128,D=4096,I=1536,dtype=bfloat16"  # a shape no other table names
    (env_dir / "sm90-NVIDIA_H200.json").write_text(json.dumps(
        {other: {"4096": dict(copy.deepcopy(ENTRY), block_m=64)}}))
    heuristic = _config.heuristic_config(1, 8, 128, 4096, 1536, "bfloat16", "sm90")
    assert _config.select_config(1, 8, 128, 4096, 1536, "bfloat16", "sm90", device="NVIDIA_H200") == heuristic
    assert _config.select_config(8192, 8, 128, 4096, 1536, "bfloat16", "sm90", device="NVIDIA_H200").block_m == 64
    # a malformed device table is reported by name
    (env_dir / "sm90-NVIDIA_H200.json").write_text("{")
    with pytest.raises(ValueError, match="sm90-NVIDIA_H200.json"):
        pick("NVIDIA_H200")


def test_lookup_order_env_dir_then_user_dir_then_package(tmp_path, monkeypatch):
    env_dir, xdg = tmp_path / "env", tmp_path / "xdg"
    user_dir = xdg / "jaxmoe"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    monkeypatch.delenv("JAXMOE_CONFIG_DIR", raising=False)
    assert _config.user_config_dir() == user_dir
    assert _config.config_dir() == user_dir  # where tune writes by default
    assert _config.config_dirs() == [user_dir, _config.PACKAGE_CONFIGS]
    packaged = _config.select_config(4096, 2, 8, 4096, 14336, "bfloat16", "sm90")  # from sm90.json

    def write(directory, block_m):
        directory.mkdir(parents=True, exist_ok=True)
        entry = dict(copy.deepcopy(ENTRY), block_m=block_m)
        (directory / "sm90.json").write_text(json.dumps({SHAPE: {"1": entry}}))

    write(user_dir, 32)
    assert _config.select_config(4096, 2, 8, 4096, 14336, "bfloat16", "sm90").block_m == 32
    # a shape the user table does not name still comes from the package's table
    other = _config.select_config(1, 8, 128, 2048, 768, "bfloat16", "sm90")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "none"))
    assert other == _config.select_config(1, 8, 128, 2048, 768, "bfloat16", "sm90")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))

    write(env_dir, 64)
    monkeypatch.setenv("JAXMOE_CONFIG_DIR", str(env_dir))
    assert _config.config_dirs() == [env_dir, user_dir, _config.PACKAGE_CONFIGS]
    assert _config.config_dir() == env_dir
    assert _config.select_config(4096, 2, 8, 4096, 14336, "bfloat16", "sm90").block_m == 64
    monkeypatch.delenv("JAXMOE_CONFIG_DIR")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "none"))
    assert _config.select_config(4096, 2, 8, 4096, 14336, "bfloat16", "sm90") == packaged


def test_home_config_dir_without_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _config.user_config_dir() == tmp_path / ".config" / "jaxmoe"


def test_a_rewritten_table_is_read_again(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXMOE_CONFIG_DIR", str(tmp_path))
    path = tmp_path / "sm90.json"
    for block_m in (32, 128):
        path.write_text(json.dumps({SHAPE: {"1": dict(copy.deepcopy(ENTRY), block_m=block_m)}}))
        assert _config.select_config(1, 2, 8, 4096, 14336, "bfloat16", "sm90").block_m == block_m


@pytest.mark.parametrize("weights,act_quant", [("int4", None), ("int4_zp", None), ("fp8_block", None),
                                               ("fp8_block", "fp8"), ("fp8", "fp8")])
@pytest.mark.parametrize("arch", _config.ARCHS)
def test_heuristic_narrows_tiles_that_keep_two_accumulators(weights, act_quant, arch):
    # at every batch size, each of the two fp32 tiles fits the register budget per thread
    for m in (1, 16, 128, 1024, 4096, 16384):
        config = _config.heuristic_config(m, 2, 8, 4096, 14336, "bfloat16", arch, weights, act_quant)
        for tile, width in ((config.stage1, 2), (config.stage2, 1)):
            per_thread = config.block_m * width * tile.block_n / (32 * tile.num_warps)
            assert per_thread <= _config.TWO_ACCUMULATOR_REGISTERS, (m, tile)
    # and only those schemes: the one-accumulator ones keep the bf16 layer's wide tiles
    wide = _config.heuristic_config(4096, 2, 8, 4096, 14336, "bfloat16", "sm90", "int8", "int8")
    assert wide.stage2.block_n == _config.WIDE_STAGE2.block_n
    narrow = _config.heuristic_config(4096, 2, 8, 4096, 14336, "bfloat16", "sm90", weights, act_quant)
    assert narrow.stage2.block_n < _config.WIDE_STAGE2.block_n


def test_fp8_fast_accumulation_is_opt_in(monkeypatch, capsys):
    """JAXMOE_FP8_FAST_ACCUM: off unless set; on, only per-token fp8 activations sum over K
    in the MMA, and fp8 w8a8 keeps one accumulator (the wide stage-2 tile); the config log
    says so; a bad value is refused with the values it takes."""
    fp8 = ("bfloat16", "sm90", "fp8", "fp8")
    monkeypatch.delenv(_config.FAST_ACCUM_ENV, raising=False)
    assert not _config.fp8_fast_accum() and not _config.fp8_mma_accumulate("fp8_token")
    assert _config.heuristic_config(4096, 2, 8, 4096, 14336, *fp8).stage2.block_n < _config.WIDE_STAGE2.block_n
    monkeypatch.setenv(_config.FAST_ACCUM_ENV, "1")
    assert _config.fp8_mma_accumulate("fp8_token")
    assert not any(_config.fp8_mma_accumulate(s) for s in ("fp8_group", "int8_token", "none"))
    assert _config.two_accumulators("fp8_block", "fp8") and not _config.two_accumulators("fp8", "fp8")
    assert _config.heuristic_config(4096, 2, 8, 4096, 14336, *fp8).stage2.block_n == _config.WIDE_STAGE2.block_n
    monkeypatch.setenv("JAXMOE_LOG_CONFIG", "1")
    _config.select_config(4096, 2, 8, 4096, 14336, "bfloat16", "sm90", "fp8", "fp8")
    assert "JAXMOE_FP8_FAST_ACCUM=1" in capsys.readouterr().err
    _config.select_config(4096, 8, 256, 7168, 2048, "bfloat16", "sm90", "fp8_block", "fp8")
    assert "FAST_ACCUM" not in capsys.readouterr().err  # per-128-channel scales: unaffected
    monkeypatch.setenv(_config.FAST_ACCUM_ENV, "0")
    assert not _config.fp8_fast_accum()
    _config.select_config(4096, 2, 8, 4096, 14336, "bfloat16", "sm90", "fp8", "fp8")
    assert "FAST_ACCUM" not in capsys.readouterr().err
    monkeypatch.setenv(_config.FAST_ACCUM_ENV, "fast")
    with pytest.raises(ValueError, match="JAXMOE_FP8_FAST_ACCUM must be unset, 1 or 0"):
        _config.fp8_fast_accum()


def test_fp8_fast_accumulation_reads_no_table(monkeypatch, tmp_path):
    """The tables hold tiles tuned for fp32 sums over K (two accumulators): with
    JAXMOE_FP8_FAST_ACCUM=1 an fp8 w8a8 layer takes the heuristic's one-accumulator tiles even
    where a table names its shape; fp8_block (per-group scales) still reads the table."""
    import json

    monkeypatch.delenv(_config.FAST_ACCUM_ENV, raising=False)
    tile = {"block_n": 32, "block_k": 128, "group_size_m": 1, "num_warps": 4, "num_stages": 2, "prequant_a": True}
    entry = {"block_m": 64, "stage1": tile, "stage2": tile}
    keys = [_config.shape_key(8, 4096, 14336, "bfloat16", "fp8", "fp8"),
            _config.shape_key(8, 4096, 14336, "bfloat16", "fp8_block", "fp8")]
    (tmp_path / "sm90.json").write_text(json.dumps({key: {"1024": entry} for key in keys}))
    monkeypatch.setenv("JAXMOE_CONFIG_DIR", str(tmp_path))
    _config._load.cache_clear()
    tuned = _config.MoEConfig.from_json(entry)
    for weights in ("fp8", "fp8_block"):
        assert _config.select_config(4096, 2, 8, 4096, 14336, "bfloat16", "sm90", weights, "fp8",
                                     device=None) == tuned
    monkeypatch.setenv(_config.FAST_ACCUM_ENV, "1")
    fast = _config.select_config(4096, 2, 8, 4096, 14336, "bfloat16", "sm90", "fp8", "fp8", device=None)
    assert fast == _config.heuristic_config(4096, 2, 8, 4096, 14336, "bfloat16", "sm90", "fp8", "fp8") != tuned
    assert _config.select_config(4096, 2, 8, 4096, 14336, "bfloat16", "sm90", "fp8_block", "fp8",
                                 device=None) == tuned


def test_mxfp4_k_tiles_hold_whole_scale_groups():
    tile = _config.GemmTile(block_n=64, block_k=16)
    assert _config.fit_scheme(tile, "mxfp4", None).block_k == 32
    assert _config.fit_scheme(tile, "int4", None).block_k == 16  # one scale per 128: 16 divides it


def test_weight_only_decode_tiles():
    """Weight-only quantized layers that stream their weights (NVIDIA): 8-bit row blocks of
    at most 32, 256-deep K tiles where K >= 2048, mxfp4's 256-deep tiles; AMD and w8a8 keep
    the bf16 heuristic's tiles."""
    mixtral = (8, 4096, 14336)  # E, D, I
    qwen3 = (128, 2048, 768)
    for weights in _config.EIGHT_BIT_WEIGHT_ONLY:
        bf16 = _config.heuristic_config(128, 2, *mixtral, "bfloat16", "sm90")
        c = _config.heuristic_config(128, 2, *mixtral, "bfloat16", "sm90", weights)
        assert bf16.block_m == 64 and c.block_m == 32 and c.stage2.block_n == 128
        c = _config.heuristic_config(1, 2, *mixtral, "bfloat16", "sm90", weights)
        assert (c.stage1.block_k, c.stage2.block_k, c.stage2.num_warps) == (256, 256, 8)
        c = _config.heuristic_config(1, 8, *qwen3, "bfloat16", "sm90", weights)  # stage 2's K = 768
        assert (c.stage1.block_k, c.stage2.block_k) == (256, 128)
        assert _config.heuristic_config(1, 2, *mixtral, "bfloat16", "gfx942", weights).stage1.block_k == 128
    c = _config.heuristic_config(1, 2, *mixtral, "bfloat16", "sm90", "mxfp4")
    assert (c.stage1.block_n, c.stage1.block_k, c.stage2.block_n, c.stage2.block_k) == (32, 256, 64, 256)
    w8a8 = _config.heuristic_config(1, 2, *mixtral, "bfloat16", "sm90", "int8", "int8")
    assert w8a8 == _config.heuristic_config(1, 2, *mixtral, "bfloat16", "sm90", "int8", "int8")
    assert w8a8.stage1.block_k == 128
    # past decode sizes the bf16 tiles, mxfp4's stage 2 narrowed to 128 columns (it spilled at 256)
    assert _config.heuristic_config(4096, 2, *mixtral, "bfloat16", "sm90", "int8").block_m == 128
    assert _config.heuristic_config(4096, 2, *mixtral, "bfloat16", "sm90", "mxfp4").stage2.block_n == 128


def test_mma_operand_choices():
    assert _config.swap_ab("int4", "none") and _config.swap_ab("int4_zp", "none")
    assert not any(_config.swap_ab(w, "none") for w in ("none", "int8", "fp8", "fp8_block", "mxfp4"))
    assert not _config.swap_ab("int8", "int8_token")
    assert _config.scaled_dot("mxfp4", "bfloat16", "sm90") and _config.scaled_dot("mxfp4", "bfloat16", "gfx950")
    assert not _config.scaled_dot("mxfp4", "bfloat16", "gfx942")
    assert not _config.scaled_dot("mxfp4", "float16", "sm90") and not _config.scaled_dot("mxfp4", "float32", "sm90")
    assert not _config.scaled_dot("int4", "bfloat16", "sm90")


def test_backward_tiles():
    """The data-gradient GEMMs take the 256-wide tile at 128-row blocks and >= 512 output
    columns on NVIDIA; the stage-1 backward (two B tiles), narrower outputs, smaller
    blocks and AMD keep theirs; every tile fits the arch's shared memory."""
    bf16 = "bfloat16"
    wide = _config.backward_tile(128, bf16, "sm90", fused=False, n_out=768)
    assert (wide.block_n, wide.num_stages) == (256, 4)
    assert _config.backward_tile(128, bf16, "sm90", fused=False, n_out=256).block_n == 128
    assert _config.backward_tile(128, bf16, "sm90", fused=False).block_n == 128  # columns unknown
    assert _config.backward_tile(128, bf16, "sm90", fused=True, n_out=4096).block_n == 128
    assert _config.backward_tile(64, bf16, "sm90", fused=False, n_out=4096).block_n == 128
    for arch in _config.ARCHS:
        for fused in (False, True):
            t = _config.backward_tile(128, bf16, arch, fused=fused, n_out=14336)
            assert t.shared_bytes(128, 2, fused) <= _config.SHARED_MEMORY_LIMIT[arch]
            if arch.startswith("gfx"):
                assert t.block_n <= 64


@pytest.mark.parametrize("rows, block_r, k_blocks, want", [
    (128, 64, 56, 32),   # DeepSeek-V3 at M = 4096: 2 steps an expert, 32 tiles a program
    (1024, 64, 32, 4),   # Mixtral-8x7B: 16 steps, 4 tiles
    (4096, 64, 32, 1),   # 64 steps: one tile is enough
    (256, 64, 6, 6),     # capped at the tiles there are
    (0, 64, 8, 8),       # no rows: one (empty) step a tile
])
def test_weight_grad_k_group(rows, block_r, k_blocks, want):
    assert _config.weight_grad_k_group(rows, block_r, k_blocks) == want


def test_weight_grad_k_groups_are_few_over_batch_sizes():
    """Rounded up to powers of two: one kernel per doubling of rows per expert, not per M."""
    groups = {_config.weight_grad_k_group(m * 8 / 256, 64, 56) for m in range(1, 16385, 7)}
    assert groups <= {1, 2, 4, 8, 16, 32, 56} and len(groups) <= 7


def test_stage2_split_k_only_where_a_decode_stage_2_has_few_programs():
    """The heuristic splits K in stage 2 for int4 weights at decode sizes with few programs
    (one or two tokens on Mixtral-8x7B, gpt-oss-120b), never at M = 4 there, never for other
    schemes, on AMD, with activation quantization or where K is too short to split; tables
    name split_k only where it is not 1, and read it back."""
    from jaxmoe.models import PRESETS

    def split(name, m, weights="int4", arch="sm90", act_quant=None):
        p = PRESETS[name]
        return _config.heuristic_config(m, p.top_k, p.experts, p.hidden, p.intermediate, "bfloat16", arch, weights,
                                        act_quant).stage2.split_k

    assert [split("mixtral-8x7b", m) for m in (1, 2, 4, 16, 4096)] == [8, 4, 1, 1, 1]
    assert [split("gpt-oss-120b", m) for m in (1, 2, 4)] == [4, 2, 1]
    assert split("mixtral-8x7b", 1, "int4_zp") == 8
    assert split("qwen3-30b-a3b", 1) == 1  # K = 768: no split keeps 4 K tiles
    for weights in ("none", "int8", "fp8", "fp8_block", "mxfp4"):
        assert split("mixtral-8x7b", 1, weights) == 1
    assert split("mixtral-8x7b", 1, "int8", act_quant="int8") == 1
    assert split("mixtral-8x7b", 1, arch="gfx942") == 1
    p = PRESETS["mixtral-8x7b"]
    config = _config.heuristic_config(1, p.top_k, p.experts, p.hidden, p.intermediate, "bfloat16", "sm90", "int4")
    d = config.to_json()
    assert d["stage2"]["split_k"] == 8 and "split_k" not in d["stage1"]
    assert _config.MoEConfig.from_json(d) == config
    assert _config.check_entry("t.json", "entry", d) == config


def test_activations_rounded_before_the_gemm_from_32_rows_per_expert():
    """With act_quant the heuristic rounds A in a pass before each GEMM (``prequant_a``)
    from 32 rows per expert (``PREQUANT_MIN_ROWS``), on every arch, and
    never without act_quant; a table names the flag only where it is set, and reads it back."""
    from jaxmoe.models import PRESETS

    def prequant(name, m, weights="fp8", act_quant="fp8", arch="sm90"):
        p = PRESETS[name]
        c = _config.heuristic_config(m, p.top_k, p.experts, p.hidden, p.intermediate, "bfloat16", arch, weights,
                                     act_quant)
        assert c.stage1.prequant_a == c.stage2.prequant_a
        return c.stage1.prequant_a

    # Mixtral-8x7B: 32 rows per expert at M = 128; Qwen3-30B-A3B at 512; DeepSeek-V3 at 1024
    assert [prequant("mixtral-8x7b", m) for m in (1, 16, 64, 127, 128, 1024, 4096)] == [False] * 4 + [True] * 3
    assert [prequant("qwen3-30b-a3b", m) for m in (128, 511, 512, 1024, 4096)] == [False, False, True, True, True]
    assert [prequant("deepseek-v3", m, "fp8_block") for m in (512, 1023, 1024, 4096)] == [False, False, True, True]
    assert prequant("mixtral-8x7b", 4096, "int8", "int8")
    assert prequant("mixtral-8x7b", 4096, arch="gfx942") and prequant("mixtral-8x7b", 4096, arch="gfx950")
    for weights in ("none", "int8", "int4", "mxfp4"):
        assert not prequant("mixtral-8x7b", 4096, weights, None)
    p = PRESETS["mixtral-8x7b"]
    config = _config.heuristic_config(4096, p.top_k, p.experts, p.hidden, p.intermediate, "bfloat16", "sm90", "fp8",
                                      "fp8")
    d = config.to_json()
    assert d["stage1"]["prequant_a"] is True and d["stage2"]["prequant_a"] is True
    assert _config.MoEConfig.from_json(d) == config
    assert _config.check_entry("t.json", "entry", d) == config
    assert "prequant_a" not in _config.heuristic_config(16, p.top_k, p.experts, p.hidden, p.intermediate, "bfloat16",
                                                        "sm90", "fp8", "fp8").to_json()["stage1"]


def test_tma_is_a_tile_flag_that_the_environment_overrides(monkeypatch):
    """A tile's ``tma`` asks for B by TMA (sm_90, where the view allows it); ``JAXMOE_TMA=1``
    turns it on for every GEMM, ``0`` off for every GEMM; it round-trips through a table
    entry, which names it only when set."""
    from jaxmoe.ops.gemm import triton as gemm_triton

    tile = _config.GemmTile(128, 64, 8, 8, 3, tma=True)
    config = _config.MoEConfig(128, tile, _config.GemmTile(256, 64, 8, 8, 4))
    json_ = config.to_json()
    assert json_["stage1"]["tma"] is True and "tma" not in json_["stage2"]
    assert _config.MoEConfig.from_json(json_) == config

    def view(tile, arch="sm90", dtype="bfloat16"):
        spec = gemm_triton.plan_gemm(a_shape=(64, 256), b_shape=(4, 512, 256), dtype=dtype, num_rows=128, top_k=2,
                                     block_m=64, num_blocks=6, tile=tile, activation="silu",
                                     mul_routed_weight=False, arch=arch)
        return dict(spec.constexprs)["B_DESC"]

    monkeypatch.delenv(_config.TMA_ENV, raising=False)
    assert _config.tma_override() is None
    assert view(tile) == "nk_gate_up" and view(_config.GemmTile(128, 64, 8, 8, 3)) == "none"
    assert view(dataclasses.replace(tile, num_stages=2, block_n=64), arch="gfx950") == "none"
    assert view(dataclasses.replace(tile, num_stages=2), dtype="float32") == "none"
    monkeypatch.setenv(_config.TMA_ENV, "0")
    assert _config.tma_override() is False and view(tile) == "none"
    monkeypatch.setenv(_config.TMA_ENV, "1")
    assert view(_config.GemmTile(128, 64, 8, 8, 3)) == "nk_gate_up"
    monkeypatch.setenv(_config.TMA_ENV, "sometimes")
    with pytest.raises(ValueError, match="JAXMOE_TMA"):
        view(tile)


def test_the_h100_reads_weights_by_tma_where_measured_and_the_h200_does_not(monkeypatch):
    """The H100's own table turns TMA on for Mixtral-8x7B bf16 from M = 1024 (measured
    8-10 % faster there on that card) and DeepSeek-V3 bf16 from M = 4096 (3 %); below
    those sizes, on an H200 and for other layers, the arch table's tiles stay as they are."""
    monkeypatch.delenv(_config.TMA_ENV, raising=False)

    def pick(m, device, shape=(8, 4096, 14336), top_k=2):
        e, d, i = shape
        return _config.select_config(m, top_k, e, d, i, "bfloat16", "sm90", device=device)

    for shape, top_k, sizes in (((8, 4096, 14336), 2, (1024, 4096, 16384)), ((256, 7168, 2048), 8, (4096, 16384))):
        for m in sizes:
            h100, h200 = pick(m, "NVIDIA_H100_80GB_HBM3", shape, top_k), pick(m, "NVIDIA_H200", shape, top_k)
            assert h100.stage1.tma and h100.stage2.tma
            assert not h200.stage1.tma and not h200.stage2.tma
            assert h100 == _config.MoEConfig(h200.block_m, *(dataclasses.replace(t, tma=True)
                                                             for t in (h200.stage1, h200.stage2)))
    assert not pick(512, "NVIDIA_H100_80GB_HBM3").stage1.tma
    assert not pick(1024, "NVIDIA_H100_80GB_HBM3", (256, 7168, 2048), 8).stage1.tma
    assert not pick(4096, "NVIDIA_H100_80GB_HBM3", (128, 2048, 768), 8).stage1.tma


def test_the_backward_reads_each_weight_by_tma_where_its_forward_stage_does(monkeypatch):
    """The backward's GEMMs take the ``tma`` flag of the forward stage that reads the same
    weights: ``dy @ w2[e]`` stage 2's, ``d gate_up @ w1[e]`` and the stage-1 recompute stage
    1's; the tiles are otherwise the backward's own. ``JAXMOE_TMA=0`` still turns every
    descriptor off."""
    from jaxmoe.ops.moe import triton as moe_triton

    monkeypatch.delenv(_config.TMA_ENV, raising=False)
    p = PRESETS["mixtral-8x7b"]
    base = _config.select_config(4096, p.top_k, p.experts, p.hidden, p.intermediate, "bfloat16", "sm90")
    for w1_tma, w2_tma in ((True, False), (False, True), (True, True), (False, False)):
        config = _config.MoEConfig(base.block_m, dataclasses.replace(base.stage1, tma=w1_tma),
                                   dataclasses.replace(base.stage2, tma=w2_tma))
        tiles = _config.backward_tiles(config, jnp.bfloat16, "sm90", p.hidden, p.intermediate)
        assert (tiles.g.tma, tiles.dx.tma, tiles.act.tma, tiles.gate_up.tma) == (w2_tma, w1_tma, w1_tma, w1_tma)
        plain = _config.backward_tile(base.block_m, jnp.bfloat16, "sm90", fused=False, n_out=p.hidden)
        assert dataclasses.replace(tiles.dx, tma=False) == plain
        specs = moe_triton.plan_fused_moe_backward(4096, p.top_k, p.experts, p.hidden, p.intermediate, jnp.bfloat16,
                                                   "sm90", "silu", config)
        g, act, dx = (dict(s.constexprs)["B_DESC"] for s in specs[:3])
        assert (g != "none", act != "none", dx != "none") == (w2_tma, w1_tma, w1_tma), (g, act, dx)
        monkeypatch.setenv(_config.TMA_ENV, "0")
        specs = moe_triton.plan_fused_moe_backward(4096, p.top_k, p.experts, p.hidden, p.intermediate, jnp.bfloat16,
                                                   "sm90", "silu", config)
        assert {dict(s.constexprs).get("B_DESC", "none") for s in specs} == {"none"}
        monkeypatch.delenv(_config.TMA_ENV)
    # on the H100, Mixtral-8x7B's table config plans the very launches JAXMOE_TMA=1 does,
    # forward and backward: the training step timed with the variable is the default's
    h100 = _config.select_config(4096, p.top_k, p.experts, p.hidden, p.intermediate, "bfloat16", "sm90",
                                 device="NVIDIA_H100_80GB_HBM3")

    def plans():
        specs = (moe_triton.plan_fused_moe(4096, p.top_k, p.experts, p.hidden, p.intermediate, jnp.bfloat16, "sm90",
                                           "silu", h100)
                 + moe_triton.plan_fused_moe_backward(4096, p.top_k, p.experts, p.hidden, p.intermediate,
                                                      jnp.bfloat16, "sm90", "silu", h100))
        return [(s.name, s.constexprs, s.num_warps, s.num_stages) for s in specs]

    default = plans()
    monkeypatch.setenv(_config.TMA_ENV, "1")
    assert plans() == default
    assert sum(dict(c).get("B_DESC", "none") != "none" for _, c, _, _ in default) == 5  # 2 forward, 3 backward


def test_tune_tries_tma_on_sm90_only():
    from jaxmoe.tools import tune

    sm90 = tune.candidates(4096, 8, 128, 2048, 768, "bfloat16", "sm90")
    assert any(c.stage1.tma and c.stage2.tma for c in sm90) and not all(c.stage1.tma for c in sm90)
    assert not any(c.stage1.tma or c.stage2.tma for c in tune.candidates(4096, 8, 128, 2048, 768, "bfloat16",
                                                                          "gfx942"))
