"""Head storage and the registry: exact round trips, and every refusal with a message that names the problem.

No model is loaded: heads are built for a small made-up backbone fingerprint (d = 8, 4 layers).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import arbiter.heads.io as hio
from arbiter.heads import (
    BackboneFingerprint,
    HeadConfig,
    HeadLoadError,
    HeadNotFound,
    HeadRegistry,
    build_head,
    load_head,
    read_config,
    save_head,
)

FP = BackboneFingerprint(model_name="tiny-test", hidden_size=8, num_layers=4, vocab_hash="0123456789abcdef")


def make(name="h", pooler="identity", layer=-1, seed=0, fp=FP) -> tuple[torch.nn.Module, HeadConfig]:
    cfg = HeadConfig(name=name, backbone=fp, hidden_size=fp.hidden_size, pooler=pooler, layer=layer,
                     ffn_size=12 if pooler == "swiglu_tanh" else None, provenance={"seed": seed, "metrics": {"acc": 0.5}})
    g = torch.Generator().manual_seed(seed)
    head = build_head(cfg)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return head.eval(), cfg


def saved(root: Path, name="h", **kw) -> Path:
    head, cfg = make(name, **kw)
    return save_head(head, cfg, root / name)


def refuse(directory, match: str, **kw) -> str:
    with pytest.raises(HeadLoadError, match=match) as ei:
        load_head(directory, **kw)
    return str(ei.value)


# --- round trip --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooler", ["identity", "affine_tanh", "swiglu_tanh"])
def test_round_trip_gives_identical_outputs(tmp_path, pooler):
    head, cfg = make("rt", pooler=pooler, layer=2 if pooler == "swiglu_tanh" else -1, seed=3)
    d = save_head(head, cfg, tmp_path / "rt")
    assert sorted(p.name for p in d.iterdir()) == ["README.md", "head.safetensors", "head_config.json"]  # + the card
    loaded, cfg2 = load_head(d, expected_backbone=FP)
    assert cfg2 == cfg
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))  # [B, d]
    with torch.no_grad():
        assert torch.equal(loaded(x), head(x))  # [B]
    for k, v in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    # Nothing but the target directory is left behind.
    assert [p.name for p in tmp_path.iterdir()] == ["rt"]


def test_save_over_an_existing_head_replaces_it(tmp_path):
    d = saved(tmp_path, "h", seed=1)
    head2, cfg2 = make("h", pooler="affine_tanh", seed=2)
    save_head(head2, cfg2, d)
    loaded, cfg = load_head(d)
    assert cfg.pooler == "affine_tanh"
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), head2(x))
    assert [p.name for p in tmp_path.iterdir()] == ["h"]


# --- atomic save -------------------------------------------------------------------------------------------


def _boom(*a, **k):
    raise OSError("disk full (simulated)")


def test_failed_save_leaves_no_target_and_no_temp_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(hio, "save_file", _boom)
    head, cfg = make("h")
    with pytest.raises(OSError, match="disk full"):
        save_head(head, cfg, tmp_path / "h")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_leaves_the_old_head_intact(tmp_path, monkeypatch):
    d = saved(tmp_path, "h", seed=1)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    monkeypatch.setattr(hio, "save_file", _boom)
    head, cfg = make("h", seed=2)
    with pytest.raises(OSError):
        save_head(head, cfg, d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["h"]
    load_head(d, expected_backbone=FP)


# --- refusals ----------------------------------------------------------------------------------------------


def test_wrong_shape_missing_and_unexpected_tensors(tmp_path):
    d = saved(tmp_path, "h", pooler="affine_tanh")
    w = d / "head.safetensors"
    good = {k: v.clone() for k, v in load_head(d)[0].state_dict().items()}

    save_file({**good, "reward.weight": torch.zeros(1, 9)}, str(w))
    msg = refuse(d, "reward.weight")
    assert "[1, 9]" in msg and "[1, 8]" in msg

    save_file({k: v for k, v in good.items() if k != "pooler.dense.bias"}, str(w))
    assert "missing ['pooler.dense.bias']" in refuse(d, "do not match pooler 'affine_tanh'")

    save_file({**good, "extra.weight": torch.zeros(2)}, str(w))
    assert "unexpected ['extra.weight']" in refuse(d, "do not match")

    save_file({**good, "reward.weight": torch.zeros(1, 8, dtype=torch.int32)}, str(w))
    refuse(d, "dtype")


@pytest.mark.parametrize("field,value", [("model_name", "other-model"), ("num_layers", 5),
                                         ("vocab_hash", "ffffffffffffffff")])
def test_wrong_backbone_names_the_field(tmp_path, field, value):
    d = saved(tmp_path, "h")
    other = FP.model_copy(update={field: value})
    msg = refuse(d, "another backbone", expected_backbone=other)
    assert field in msg and repr(value) in msg and repr(getattr(FP, field)) in msg
    # The registry refuses it the same way, for files and in-memory heads alike.
    reg = HeadRegistry(tmp_path, other)
    with pytest.raises(HeadLoadError, match=field):
        reg.load("h")
    with pytest.raises(HeadLoadError, match=field):
        reg.add(*make("m"))
    assert reg.names() == []


def test_hidden_size_mismatch_is_refused(tmp_path):
    d = saved(tmp_path, "h")
    raw = json.loads((d / "head_config.json").read_text())
    raw["hidden_size"] = 16
    (d / "head_config.json").write_text(json.dumps(raw))
    refuse(d, "hidden_size 16 differs")


def test_unknown_format_version_and_bad_config(tmp_path):
    d = saved(tmp_path, "h")
    cfg_path = d / "head_config.json"
    raw = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**raw, "format_version": 2}))
    assert "reads version 1" in refuse(d, "unknown head format_version 2")
    cfg_path.write_text(json.dumps({k: v for k, v in raw.items() if k != "format_version"}))
    refuse(d, "format_version None")
    cfg_path.write_text("{not json")
    refuse(d, "not valid JSON")
    cfg_path.write_text(json.dumps([1, 2]))
    refuse(d, "expected a JSON object")
    cfg_path.write_text(json.dumps({**raw, "pooler": "mlp"}))
    refuse(d, "invalid head config at pooler")
    cfg_path.write_text(json.dumps({**raw, "layer": 4}))
    refuse(d, r"layer 4 is outside \[-1, 3\]")
    cfg_path.write_text(json.dumps({**raw, "surprise": 1}))
    refuse(d, "invalid head config at surprise")
    with pytest.raises(HeadLoadError, match="unknown head format_version 2"):
        cfg_path.write_text(json.dumps({**raw, "format_version": 2}))
        read_config(d)


@pytest.mark.parametrize("zipfile", [True, False])
def test_pickled_weights_are_never_loaded(tmp_path, zipfile):
    d = saved(tmp_path, "h")
    state = load_head(d)[0].state_dict()
    torch.save(state, d / "head.safetensors", _use_new_zipfile_serialization=zipfile)
    msg = refuse(d, "pickle")
    assert "only safetensors" in msg


@pytest.mark.parametrize("extra", ["pytorch_model.bin", "head.pt", "model.pkl", "notes.txt"])
def test_extra_files_in_the_head_dir_are_refused(tmp_path, extra):
    d = saved(tmp_path, "h")
    torch.save({"x": torch.zeros(1)}, d / extra)
    msg = refuse(d, "unexpected files")
    assert extra in msg and "pickled weights are never loaded" in msg


def test_missing_files_and_garbage_weights(tmp_path):
    d = saved(tmp_path, "h")
    (d / "head.safetensors").write_bytes(b"\x00" * 64)
    refuse(d, "not a valid safetensors file")
    (d / "head.safetensors").unlink()
    refuse(d, "missing head.safetensors")
    refuse(tmp_path / "nope", "no such head directory")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(tmp_path, bad):
    d = saved(tmp_path, "h", pooler="affine_tanh")
    state = {k: v.clone() for k, v in load_head(d)[0].state_dict().items()}
    state["pooler.dense.weight"][3, 5] = bad
    save_file(state, str(d / "head.safetensors"))
    assert "pooler.dense.weight" in refuse(d, "NaN or Inf")


def test_symlinked_directory_and_files_are_refused(tmp_path):
    real = saved(tmp_path, "real")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    refuse(link, "symlink")

    d = tmp_path / "withlinks"
    d.mkdir()
    (d / "head_config.json").write_bytes((real / "head_config.json").read_bytes())
    (d / "head.safetensors").symlink_to(real / "head.safetensors")
    refuse(d, "head.safetensors: must be a regular file, not a symlink")


# --- registry ----------------------------------------------------------------------------------------------


def test_registry_resolve_refuses_escapes(tmp_path):
    root = tmp_path / "heads"
    root.mkdir()
    saved(root, "ok")
    outside = saved(tmp_path, "outside")
    (root / "sneaky").symlink_to(outside, target_is_directory=True)
    (root / "nested").mkdir()
    (root / "nested" / "up").symlink_to(tmp_path, target_is_directory=True)
    reg = HeadRegistry(root, FP)
    assert reg.resolve("ok") == (root / "ok").resolve()
    cases = {
        "../outside": "outside the heads directory",
        "ok/../../outside": "outside the heads directory",
        str(outside): "relative path",
        "/etc": "relative path",
        "": "relative path",
        "a\x00b": "relative path",
        ".": "sub-directory",
        "sneaky": "symlink",
        "nested/up/outside": "outside the heads directory",
    }
    for path, why in cases.items():
        with pytest.raises(HeadLoadError, match=why):
            reg.load(path)
    assert reg.names() == []
    with pytest.raises(HeadLoadError, match="no heads directory"):
        HeadRegistry(None, FP).load("ok")


def test_registry_load_swap_unload_and_failed_swap_keeps_the_old_head(tmp_path):
    saved(tmp_path, "a", seed=1)
    saved(tmp_path, "b", seed=2, pooler="swiglu_tanh")
    bad = saved(tmp_path, "bad", seed=3)
    (bad / "head.safetensors").write_bytes(b"garbage")
    reg = HeadRegistry(tmp_path, FP)
    a = reg.load("a")
    assert reg.names() == ["a"] and a.config.provenance["metrics"] == {"acc": 0.5}
    with pytest.raises(HeadLoadError, match="already loaded"):
        reg.load("a")
    snap = reg.snapshot()

    with pytest.raises(HeadLoadError, match="not a valid safetensors"):
        reg.swap("a", "bad")
    assert reg.get("a") is a  # the old head keeps serving

    b = reg.swap("a", "b")
    assert reg.get("a") is b and b.name == "a" and b.config.pooler == "swiglu_tanh"
    assert snap["a"] is a  # a snapshot taken before the swap still scores with the old head
    with pytest.raises(HeadNotFound):
        reg.swap("missing", "b")
    reg.load("b", name="second")
    assert reg.names() == ["a", "second"]
    reg.unload("a")
    assert reg.names() == ["second"]
    with pytest.raises(HeadNotFound):
        reg.unload("a")
    with pytest.raises(HeadNotFound):
        reg.get("a")


def test_load_all_loads_good_heads_and_reports_bad_ones(tmp_path):
    saved(tmp_path, "good1", seed=1)
    saved(tmp_path, "good2", seed=2)
    saved(tmp_path, "wrongbb", fp=FP.model_copy(update={"vocab_hash": "differentvocab00"}))
    pk = saved(tmp_path, "pickled")
    torch.save({"reward.weight": torch.zeros(1, 8)}, pk / "head.safetensors")
    (tmp_path / "not_a_head").mkdir()  # no config: skipped silently
    (tmp_path / ".h.tmp-123").mkdir()  # a temp dir of an interrupted save: skipped
    reg = HeadRegistry(tmp_path, FP)
    loaded, errors = reg.load_all()
    assert loaded == ["good1", "good2"] and reg.names() == ["good1", "good2"]
    assert set(errors) == {"wrongbb", "pickled"}
    assert "vocab_hash" in errors["wrongbb"] and "pickle" in errors["pickled"]


def test_head_on_a_layer_the_engine_cannot_serve_is_refused_at_load(tmp_path):
    saved(tmp_path, "mid", layer=2)
    saved(tmp_path, "final", layer=-1)
    reg = HeadRegistry(tmp_path, FP, supported_layers=frozenset({-1}), engine="PoolingEngine")
    with pytest.raises(HeadLoadError, match=r"head 'mid' reads layer 2, which the PoolingEngine engine cannot serve "
                                            r"\(it serves layers \[-1\]\)"):
        reg.load("mid")
    assert reg.load("final").name == "final"
    head, cfg = make("mem", layer=1)
    with pytest.raises(HeadLoadError, match="reads layer 1"):
        reg.add(head, cfg)
    loaded, errors = HeadRegistry(tmp_path, FP, supported_layers=frozenset({-1})).load_all()
    assert loaded == ["final"] and "reads layer 2" in errors["mid"]
    # Without a restriction (both shipped engines serve every layer) the same head loads.
    assert HeadRegistry(tmp_path, FP).load("mid").config.layer == 2


def test_sync_follows_the_heads_directory(tmp_path):
    saved(tmp_path, "a", seed=1)
    reg = HeadRegistry(tmp_path, FP)
    loaded, _ = reg.load_all()
    assert loaded == ["a"] and reg.sync() == {"added": [], "swapped": [], "removed": [], "errors": []}
    saved(tmp_path, "b", seed=2)
    assert reg.sync()["added"] == ["b"] and reg.names() == ["a", "b"]
    old = reg.get("a").module.reward.weight.clone()
    import shutil

    shutil.rmtree(tmp_path / "a")
    saved(tmp_path, "a", seed=3)  # a new version of head a
    assert reg.sync()["swapped"] == ["a"]
    assert not torch.equal(reg.get("a").module.reward.weight, old)
    (tmp_path / "b" / "head.safetensors").write_bytes(b"broken")  # a broken version: the old one keeps serving
    res = reg.sync()
    assert res["swapped"] == [] and "b" in res["errors"][0] and "b" in reg.names()
    shutil.rmtree(tmp_path / "b")
    # missing from one scan could be a replacement in progress: unloaded when the next scan misses it too
    assert reg.sync()["removed"] == [] and reg.names() == ["a", "b"]
    assert reg.sync()["removed"] == ["b"] and reg.names() == ["a"]
    saved(tmp_path, "c", seed=5)
    assert reg.sync()["added"] == ["c"]
    shutil.rmtree(tmp_path / "c")
    assert reg.sync()["removed"] == []
    saved(tmp_path, "c", seed=6)  # back before the second scan: never unloaded, swapped to the new files
    assert reg.sync() == {"added": [], "swapped": ["c"], "removed": [], "errors": []}
    assert reg.sync() == {"added": [], "swapped": [], "removed": [], "errors": []}
    shutil.rmtree(tmp_path / "c")
    reg.sync()
    reg.sync()
    # A head the admin API loaded from another path under its own name is not the directory's to manage.
    saved(tmp_path / "staging", "x", seed=4)
    reg.load("staging/x", "custom")
    assert reg.sync()["removed"] == [] and "custom" in reg.names()


# --- size caps: checked before anything is allocated ------------------------------------------------------------


def _no_allocation(monkeypatch):
    """Make building a head module or reading its tensors fail loudly: a refusal must come before either."""

    def never(*a, **k):
        raise AssertionError("allocated before the sizes were checked")

    monkeypatch.setattr(hio, "DPHHead", never)
    monkeypatch.setattr(hio, "load_file", never)


@pytest.mark.parametrize("edit, where", [
    ({"pooler": "swiglu_tanh", "ffn_size": 10**7}, "ffn_size"),  # ~69 GB of float32 before the cap
    ({"pooler": "swiglu_tanh", "ffn_size": 10**12}, "ffn_size"),  # more than any machine: a RuntimeError before
    ({"hidden_size": 10**6, "backbone": {**FP.model_dump(), "hidden_size": 10**6}}, "hidden_size"),
    ({"backbone": {**FP.model_dump(), "num_layers": 10**9}}, "num_layers"),
    # each size within its own cap, the parameter count (65536^2 for affine_tanh) over the total
    ({"pooler": "affine_tanh", "hidden_size": 65536, "backbone": {**FP.model_dump(), "hidden_size": 65536}}, "config"),
])
def test_oversized_head_configs_are_refused_before_anything_is_allocated(tmp_path, monkeypatch, edit, where):
    d = saved(tmp_path, "h")
    cfg = json.loads((d / "head_config.json").read_text())
    (d / "head_config.json").write_text(json.dumps({**cfg, **edit}))
    assert (d / "head_config.json").stat().st_size < 1024  # a 1 KB file decides what the loader would allocate
    _no_allocation(monkeypatch)
    msg = refuse(d, "invalid head config")
    assert where in msg


def test_tensor_shapes_are_checked_from_the_safetensors_header(tmp_path, monkeypatch):
    d = saved(tmp_path, "h")
    w = d / "head.safetensors"
    save_file({"reward.weight": torch.zeros(1, 9)}, str(w))
    _no_allocation(monkeypatch)
    msg = refuse(d, "reward.weight")
    assert "[1, 9]" in msg and "[1, 8]" in msg
    # A header that claims a huge tensor the file does not hold (offsets past its end), per the safetensors format:
    # u64 little-endian header length, then the JSON header.
    header = json.dumps({"reward.weight": {"dtype": "F32", "shape": [1, 8], "data_offsets": [0, 4 * 10**9]}}).encode()
    w.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 32)
    refuse(d, "bad entry for tensor 'reward.weight'")
    w.write_bytes((10**12).to_bytes(8, "little") + b"{}")  # a header length past the file
    refuse(d, "header length")


def test_a_bad_head_never_stops_the_scan_of_the_heads_after_it(tmp_path):
    reg = HeadRegistry(tmp_path, FP)
    assert reg.load_all() == ([], {})
    d = saved(tmp_path, "aaa")
    cfg = json.loads((d / "head_config.json").read_text())
    (d / "head_config.json").write_text(json.dumps({**cfg, "pooler": "swiglu_tanh", "ffn_size": 10**12}))
    saved(tmp_path, "zzz", seed=1)
    res = reg.sync()
    assert res["added"] == ["zzz"] and len(res["errors"]) == 1 and res["errors"][0].startswith("aaa:"), res
    assert str(tmp_path) not in res["errors"][0]  # relative to the heads directory


def test_every_registry_refusal_names_paths_relative_to_the_heads_directory(tmp_path):
    reg = HeadRegistry(tmp_path, FP)
    d = saved(tmp_path, "h")
    msgs = []
    for damage in ("config", "weights", "extra", "missing", "backbone"):
        saved(tmp_path, "h")
        if damage == "config":
            (d / "head_config.json").write_text("{not json")
        elif damage == "weights":
            (d / "head.safetensors").write_bytes(b"garbage!")
        elif damage == "extra":
            (d / "model.pt").write_bytes(b"x")
        elif damage == "missing":
            (d / "head.safetensors").unlink()
        else:
            cfg = json.loads((d / "head_config.json").read_text())
            (d / "head_config.json").write_text(json.dumps({**cfg, "backbone": {**cfg["backbone"], "model_name": "x"}}))
        with pytest.raises(HeadLoadError) as ei:
            reg.load("h")
        msgs.append(str(ei.value))
    with pytest.raises(HeadLoadError) as ei:
        reg.load("nope")
    msgs.append(str(ei.value))
    for m in msgs:
        assert str(tmp_path) not in m and "/tmp" not in m, m
        assert m.startswith(("h", "'h'", "nope", "'nope'")), m


def test_weights_over_the_size_cap_are_refused_before_reading(tmp_path, monkeypatch):
    d = saved(tmp_path, "h")
    monkeypatch.setattr(hio, "MAX_WEIGHTS_BYTES", 64)
    _no_allocation(monkeypatch)
    refuse(d, "weights file larger than 64 bytes")
