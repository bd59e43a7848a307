"""Adapter files and the admin API's adapter and head endpoints, without a model: PEFT-format adapters (the key
names and config fields PEFT's ``save_pretrained`` writes) for a one-layer module, every refusal of
``read_lora``, the path rules of ``POST /v1/admin/adapters`` (every component inside ARBITER_ADAPTERS_DIR), the
bounded wait of ``DELETE``, and no absolute path in any admin error body.

The real-model adapter tests are tests/test_multi_adapter.py and tests/test_adapter_serving.py (integration).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from arbiter.backbone import AdapterError, read_lora
from arbiter.generation.adapters import AdapterBusy, AdapterSet
from arbiter.testing.fakes import FAKE_FINGERPRINT, FakeEngine, save_random_head
from arbiter.testing.served import assert_error, heads_dir, served

ADMIN = {"Authorization": "Bearer adm"}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(4, 6)


def write_adapter(d: Path, cfg: dict | None = None, state: dict | None = None, r: int = 2) -> Path:
    """A PEFT LoRA adapter for Tiny.proj: A [r, 4], B [6, r] under PEFT's key names."""
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    base = {"base_model.model.proj.lora_A.weight": torch.randn(r, 4, generator=g),
            "base_model.model.proj.lora_B.weight": torch.randn(6, r, generator=g)}
    save_file(state if state is not None else base, str(d / "adapter_model.safetensors"))
    conf = {"peft_type": "LORA", "r": r, "lora_alpha": 4, "target_modules": ["proj"], "bias": "none", **(cfg or {})}
    (d / "adapter_config.json").write_text(json.dumps(conf))
    return d


def test_a_good_adapter_gives_w_plus_alpha_over_r_b_a(tmp_path):
    m = Tiny()
    w0 = m.proj.weight.detach().clone()
    d = write_adapter(tmp_path / "good")
    ads = AdapterSet(m)
    ads.load("good", d)
    ads.activate("good")
    from safetensors.torch import load_file

    st = load_file(str(d / "adapter_model.safetensors"))
    want = w0 + (4 / 2) * st["base_model.model.proj.lora_B.weight"] @ st["base_model.model.proj.lora_A.weight"]
    torch.testing.assert_close(m.proj.weight.detach(), want, rtol=1e-6, atol=1e-6)
    ads.activate(None)
    assert torch.equal(m.proj.weight.detach(), w0)


A, B = "base_model.model.proj.lora_A.weight", "base_model.model.proj.lora_B.weight"


@pytest.mark.parametrize("cfg, state, match", [
    ({"peft_type": "IA3"}, None, "is not LORA"),
    ({"use_dora": True}, None, "use_dora"),
    ({"fan_in_fan_out": True}, None, "fan_in_fan_out"),
    ({"modules_to_save": ["proj"]}, None, "modules_to_save"),
    ({"bias": "all"}, None, "trained biases"),
    ({"r": 0}, None, "r must be positive"),
    ({"r": "many"}, None, "numeric r"),
    ({"rank_pattern": {"proj": 0}}, None, "rank 0"),
    (None, {A: torch.zeros(2, 4)}, "no matching lora_B"),
    (None, {"base_model.model.nope.lora_A.weight": torch.zeros(2, 4),
            "base_model.model.nope.lora_B.weight": torch.zeros(6, 2)}, "does not have"),
    (None, {A: torch.zeros(2, 5), B: torch.zeros(6, 2)}, "does not fit"),
    (None, {A: torch.zeros(3, 4), B: torch.zeros(6, 2)}, "do not chain"),
    (None, {"something.else": torch.zeros(1)}, "no LoRA weights"),
])
def test_adapter_refusals_name_the_problem_and_never_the_absolute_path(tmp_path, cfg, state, match):
    d = write_adapter(tmp_path / "bad", cfg, state)
    with pytest.raises(AdapterError, match=match) as ei:
        read_lora(Tiny(), d, shown="bad")
    assert str(tmp_path) not in str(ei.value) and str(ei.value).startswith("bad")


def test_adapter_files_are_regular_bounded_and_well_formed(tmp_path, monkeypatch):
    import arbiter.backbone as bb

    d = write_adapter(tmp_path / "a")
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        read_lora(Tiny(), d, shown="a")
    write_adapter(d)
    (d / "adapter_model.safetensors").write_bytes(b"garbage!")
    with pytest.raises(AdapterError, match="not a valid safetensors"):
        read_lora(Tiny(), d, shown="a")
    other = write_adapter(tmp_path / "elsewhere")
    (d / "adapter_model.safetensors").unlink()
    os.symlink(other / "adapter_model.safetensors", d / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="symlink"):
        read_lora(Tiny(), d, shown="a")
    write_adapter(d := tmp_path / "b")
    monkeypatch.setattr(bb, "MAX_ADAPTER_WEIGHTS_BYTES", 64)
    with pytest.raises(AdapterError, match="larger than 64 bytes"):
        read_lora(Tiny(), d, shown="b")
    monkeypatch.setattr(bb, "MAX_ADAPTER_CONFIG_BYTES", 16)
    monkeypatch.setattr(bb, "MAX_ADAPTER_WEIGHTS_BYTES", 1 << 30)
    with pytest.raises(AdapterError, match="larger than 16 bytes"):
        read_lora(Tiny(), d, shown="b")


def test_unload_waits_a_bounded_time_for_the_adapters_batch(tmp_path):
    ads = AdapterSet(Tiny())
    ads.load("a", write_adapter(tmp_path / "a"))
    held, release = threading.Event(), threading.Event()

    def batch() -> None:  # what the engine does for a batch on adapter a
        with ads.lock:
            ads.activate("a")
            held.set()
            release.wait(10)

    t = threading.Thread(target=batch)
    t.start()
    held.wait(5)
    seen_draining = []
    probe = threading.Thread(target=lambda: (time.sleep(0.05), seen_draining.append(ads.draining("a"))))
    probe.start()
    t0 = time.monotonic()
    with pytest.raises(AdapterBusy, match="still serving a batch after 0.3 s"):
        ads.unload("a", wait_s=0.3)
    assert time.monotonic() - t0 >= 0.3
    probe.join()
    assert seen_draining == [True] and not ads.draining("a")  # draining only while the unload waits
    assert ads.names() == ["a"]  # nothing changed
    release.set()
    t.join()
    ads.unload("a", wait_s=1)
    assert ads.names() == [] and ads.active is None


# --- the admin API ---------------------------------------------------------------------------------------


@pytest.fixture
def admin_server(tmp_path):
    root = tmp_path / "adapters"
    write_adapter(root / "sub" / "good")
    outside = write_adapter(tmp_path / "outside" / "evil")
    os.symlink(outside.parent, root / "link")  # a symlinked directory in the middle of a path
    os.symlink(outside, root / "sub" / "last")  # and as the last component
    heads_root = tmp_path / "heads"
    reg = heads_dir(heads_root, "h1")
    save_random_head(FAKE_FINGERPRINT, heads_root / "h1_v2", name="h1", seed=3)
    eng = FakeEngine()
    eng.adapters = AdapterSet(Tiny())
    with served(eng, reg, admin_key="adm", adapters_dir=str(root), heads_dir=str(heads_root),
                adapter_unload_wait_s=0.3) as srv:
        yield srv, eng, tmp_path


def test_adapter_paths_stay_inside_the_adapters_directory(admin_server):
    srv, _, tmp = admin_server
    url = srv.url + "/v1/admin/adapters"
    for path, match in (("link/evil", "symlink"), ("sub/last", "symlink"), ("sub/../../outside/evil", "'..'"),
                        ("./sub/good", "sub/good"), (str(tmp / "outside" / "evil"), "relative path"), ("", None)):
        r = httpx.post(url, json={"name": "x", "path": path}, headers=ADMIN, timeout=30)
        assert r.status_code in (400, 422) or (path == "./sub/good" and r.status_code == 200), (path, r.text)
        if r.status_code == 400 and match:
            assert match in r.json()["error"]["message"], r.text
        if r.status_code == 200:
            assert httpx.delete(f"{url}/x", headers=ADMIN, timeout=30).status_code == 200
    r = httpx.post(url, json={"name": "good", "path": "sub/good"}, headers=ADMIN, timeout=30)
    assert r.status_code == 200 and r.json()["id"] == "good", r.text
    assert "good" in [m["id"] for m in httpx.get(srv.url + "/v1/models", timeout=30).json()["data"]]


def test_adapter_delete_gives_up_with_a_409_while_its_batch_runs(admin_server):
    srv, eng, _ = admin_server
    url = srv.url + "/v1/admin/adapters"
    assert httpx.post(url, json={"name": "good", "path": "sub/good"}, headers=ADMIN, timeout=30).status_code == 200
    held, release = threading.Event(), threading.Event()

    def batch() -> None:
        with eng.adapters.lock:
            held.set()
            release.wait(10)

    t = threading.Thread(target=batch)
    t.start()
    held.wait(5)
    try:
        t0 = time.monotonic()
        r = httpx.delete(f"{url}/good", headers=ADMIN, timeout=30)
        took = time.monotonic() - t0
    finally:
        release.set()
        t.join()
    assert_error(r, 409, code="adapter_busy", in_message="still serving a batch")
    assert 0.3 <= took < 10, took
    assert httpx.delete(f"{url}/good", headers=ADMIN, timeout=30).status_code == 200  # the batch is over: it goes


def test_no_admin_error_body_names_an_absolute_path(admin_server):
    srv, _, tmp = admin_server
    heads_root = tmp / "heads"
    (heads_root / "broken").mkdir()
    (heads_root / "broken" / "head_config.json").write_text("{}")
    (heads_root / "broken" / "head.safetensors").write_bytes(b"x")
    write_adapter(tmp / "adapters" / "bad", {"use_dora": True})
    a, h = srv.url + "/v1/admin/adapters", srv.url + "/v1/admin/heads"
    calls = [("post", a, {"name": "x", "path": "bad"}), ("post", a, {"name": "x", "path": "missing"}),
             ("post", a, {"name": "x", "path": "link/evil"}), ("post", a, {"name": "x", "path": "sub"}),
             ("post", a, {"name": "x", "path": str(tmp)}), ("delete", a + "/nope", None),
             ("post", h, {"path": "broken"}), ("post", h, {"path": "missing"}), ("post", h, {"path": "../x"}),
             ("post", h, {"path": str(tmp)}), ("put", h + "/h1", {"path": "broken"}), ("put", h + "/nope", {"path": "h1"}),
             ("delete", h + "/nope", None), ("post", h, {"path": "h1"})]
    for method, url, body in calls:
        r = httpx.request(method, url, json=body, headers=ADMIN, timeout=30)
        assert r.status_code in (400, 404, 409), (method, url, body, r.status_code, r.text)  # the endpoint refused it
        text = r.text
        assert str(tmp) not in text and str(tmp.resolve()) not in text and "/tmp/" not in text, (url, body, text)
    # and the heads listing shows relative paths only
    listed = httpx.get(srv.url + "/v1/heads", timeout=30).json()["data"]
    assert listed and all(not os.path.isabs(x["path"]) for x in listed), listed


def test_adapter_endpoints_need_their_keys(tmp_path):
    root = tmp_path / "adapters"
    write_adapter(root / "a")
    eng = FakeEngine()
    eng.adapters = AdapterSet(Tiny())
    with served(eng, api_key="k", admin_key="adm", adapters_dir=str(root)) as srv, httpx.Client(timeout=30) as c:
        url = srv.url + "/v1/admin/adapters"
        load = {"name": "a", "path": "a"}
        assert_error(c.get(srv.url + "/v1/adapters"), 401, code="missing_api_key")
        assert c.get(srv.url + "/v1/adapters", headers={"Authorization": "Bearer k"}).status_code == 200
        assert_error(c.post(url, json=load), 401, code="missing_api_key")
        assert_error(c.post(url, json=load, headers={"Authorization": "Bearer wrong"}), 401, code="invalid_api_key")
        assert_error(c.post(url, json=load, headers={"Authorization": "Bearer k"}), 403, code="not_admin")
        assert_error(c.delete(url + "/a", headers={"Authorization": "Bearer k"}), 403, code="not_admin")
        assert eng.adapters.names() == []  # nothing was loaded by the refused calls
        assert c.post(url, json=load, headers=ADMIN).status_code == 200
        assert c.delete(url + "/a", headers=ADMIN).status_code == 200
    with served(eng, adapters_dir=str(root)) as srv:  # no admin key configured: the admin API does not exist
        assert_error(httpx.post(srv.url + "/v1/admin/adapters", json=load, timeout=30), 404, code="admin_disabled")
