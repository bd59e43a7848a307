"""``dtype=auto`` (serving and training): bfloat16 on a CPU only where it has native bf16 matmul (AMX or
AVX512-BF16) and a start-up measurement shows bf16 faster; float32 otherwise. The choice and why are logged."""

from __future__ import annotations

import logging

import pytest

from arbiter import backbone as B

AMX_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\nbogomips\t: 4000\n"
AVX2_CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"


def test_cpuinfo_flags_are_read_from_the_flags_line():
    assert B.cpu_bf16_flags(AMX_CPUINFO) == ["amx_bf16", "avx512_bf16"]
    assert B.cpu_bf16_flags(AVX2_CPUINFO) == []
    assert B.cpu_bf16_flags("") == []


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(B, "_AUTO_CACHE", {})
    return monkeypatch


def test_auto_without_native_bf16_is_float32_and_never_measures(fresh):
    fresh.setattr(B, "cpu_bf16_flags", lambda cpuinfo=None: [])
    fresh.setattr(B, "measure_bf16_speedup", lambda reps=12: pytest.fail("must not measure without native bf16"))
    dtype, why = B.resolve_dtype("auto", "cpu")
    assert dtype == "float32" and "no native bf16" in why


@pytest.mark.parametrize("speedup,want", [(3.1, "bfloat16"), (1.05, "float32"), (0.6, "float32")])
def test_auto_with_native_bf16_follows_the_measurement(fresh, speedup, want):
    fresh.setattr(B, "cpu_bf16_flags", lambda cpuinfo=None: ["amx_bf16"])
    fresh.setattr(B, "measure_bf16_speedup", lambda reps=12: speedup)
    dtype, why = B.resolve_dtype("auto", "cpu")
    assert dtype == want and f"{speedup:.2f}x" in why


def test_explicit_dtypes_cuda_and_bad_names(fresh):
    assert B.resolve_dtype("float32", "cpu") == ("float32", "requested")
    assert B.resolve_dtype("bfloat16", "cpu") == ("bfloat16", "requested")
    assert B.resolve_dtype("auto", "cuda")[0] == "bfloat16"
    with pytest.raises(ValueError, match="not one of"):
        B.resolve_dtype("fp8", "cpu")


def test_the_real_measurement_and_the_logged_choice(fresh, caplog):
    r = B.measure_bf16_speedup(reps=2)
    assert r > 0
    with caplog.at_level(logging.INFO, logger="arbiter.backbone"):
        bb = B.load_backbone(dtype="auto")
    want = B.resolve_dtype("auto", "cpu")[0]
    assert bb.dtype == want
    assert any(f"backbone dtype {want}" in rec.getMessage() for rec in caplog.records)


def test_eval_runs_a_bf16_head_in_float32_where_bf16_is_emulated(fresh, caplog, tmp_path):
    """``arbiter eval`` loads the backbone with ``dtype=auto`` like the server, not in the head's feature dtype:
    on a CPU without native bf16 (an AVX2 AMD EPYC, say) the shipped bf16 heads run on a float32 backbone,
    and the dtype difference is logged and recorded in the report."""
    import json
    import shutil
    from pathlib import Path

    from arbiter.heads import read_config
    from arbiter.training import evaluate

    # A head made on bf16 features (as on an AMX machine): the shipped sst2 head with its config saying so.
    head = tmp_path / "sst2_bf16"
    shutil.copytree(Path(__file__).resolve().parents[1] / "heads" / "sst2", head)
    cfg = json.loads((head / "head_config.json").read_text())
    (head / "head_config.json").write_text(json.dumps({**cfg, "feature_dtype": "bfloat16"}))
    assert read_config(head).feature_dtype == "bfloat16"
    fresh.setattr(B, "cpu_bf16_flags", lambda cpuinfo=None: [])
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "Sentiment of: 'a joy to watch'", "choices": ["positive", "negative"],
                                "answer": 0}) + "\n")
    with caplog.at_level(logging.WARNING, logger="arbiter.training.evaluate"):
        report = evaluate.eval_choice(head=str(head), data=str(data), out=str(tmp_path / "out"), progress=False)
    assert report["backbone_dtype"] == "float32" and report["head_feature_dtype"] == "bfloat16"
    assert any("trained on bfloat16 features and runs on float32" in r.getMessage() for r in caplog.records)
