"""Several LoRA adapters on one base model (ARBITER_ADAPTERS): switching is exact, a request picks its adapter by
``model`` and gets what a model with that adapter merged (PEFT's own merge, reproduced by merge_lora) generates,
batches are formed per adapter, heads are tied to the adapter they were trained on, adapters load and unload at
runtime through the admin API."""

from __future__ import annotations

import copy

import httpx
import openai
import pytest
import torch

from arbiter.testing.served import served as serve_app

peft = pytest.importorskip("peft")
ADMIN = "admin-key"
MSG = [{"role": "user", "content": "Name a fruit."}]


def _make_adapter(backbone, out, seed: int, targets=("q_proj", "v_proj")):
    model = copy.deepcopy(backbone.model)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0))
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # strong enough to change greedy answers
    pm.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def adapters(backbone, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"alpha": _make_adapter(backbone, root / "alpha", 1),
            "beta": _make_adapter(backbone, root / "beta", 2, targets=("k_proj", "o_proj")), "root": root}


def test_switching_is_exact_and_equals_merging(backbone, adapters):
    from arbiter.backbone import merge_lora
    from arbiter.generation.adapters import AdapterSet

    model = copy.deepcopy(backbone.model)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    ads = AdapterSet(model)
    ads.load("alpha", adapters["alpha"])
    ads.load("beta", adapters["beta"])
    merged = copy.deepcopy(backbone.model)
    merge_lora(merged, adapters["alpha"])
    for _ in range(3):
        ads.activate("alpha")
        for k, v in merged.state_dict().items():
            torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
        ads.activate("beta")
        ads.activate(None)
        for k, v in base.items():
            assert torch.equal(model.state_dict()[k], v), k  # bit-exact base after any number of switches


@pytest.fixture(scope="module")
def served(backbone, adapters):
    from arbiter.generation.hf import HFEngine
    from arbiter.heads import HeadConfig, HeadRegistry, build_head

    engine = HFEngine(backbone)
    engine.adapters.load("alpha", adapters["alpha"])
    reg = HeadRegistry(None, backbone.fingerprint)
    torch.manual_seed(0)
    for name, prov in (("base_head", {}), ("alpha_head", {"adapter": str(adapters["alpha"])})):
        cfg = HeadConfig(name=name, backbone=backbone.fingerprint, hidden_size=backbone.hidden_size, provenance=prov)
        reg.add(build_head(cfg), cfg)
    try:
        with serve_app(engine, reg, start_timeout_s=60, admin_key=ADMIN, adapters_dir=str(adapters["root"])) as srv:
            yield srv, engine
    finally:
        engine.adapters.activate(None)  # the shared backbone goes back to its base weights


def _greedy(srv, model: str) -> str:
    c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)
    return c.chat.completions.create(model=model, messages=MSG, max_tokens=8, temperature=0).choices[0].message.content


def test_request_picks_its_adapter_by_model(served, backbone, adapters):
    from arbiter.backbone import merge_lora, prompt_ids
    from arbiter.generation.base import GenerationJob, SamplingParams

    srv, engine = served
    ids = [m["id"] for m in httpx.get(f"{srv.url}/v1/models").json()["data"]]
    assert ids == [backbone.name, "alpha"]
    got_alpha, got_base = _greedy(srv, "alpha"), _greedy(srv, backbone.name)
    # References: greedy decoding of a copy with the adapter merged, and of the base.
    ref = copy.deepcopy(backbone.model)
    merge_lora(ref, adapters["alpha"])
    p = torch.tensor([prompt_ids(backbone.tokenizer, MSG)])
    with torch.inference_mode():
        want_alpha = backbone.tokenizer.decode(
            ref.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=8, do_sample=False,
                         eos_token_id=backbone.end_id, pad_token_id=backbone.end_id)[0, p.shape[1]:],
            skip_special_tokens=True)
    (base_res,) = engine.generate([GenerationJob(p[0].tolist(), 1, SamplingParams(max_tokens=8, temperature=0.0))])
    assert got_alpha == want_alpha.strip() or got_alpha == want_alpha
    assert got_base == base_res.candidates[0].text and got_base != got_alpha
    c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)
    r = c.chat.completions.create(model="alpha", messages=MSG, max_tokens=4)
    assert r.model == "alpha"
    chunks = list(c.chat.completions.create(model="alpha", messages=MSG, max_tokens=4, stream=True))
    assert chunks and {ch.model for ch in chunks} == {"alpha"}  # every chunk names the adapter, as the response does


def test_heads_are_tied_to_their_adapter(served, backbone):
    srv, _ = served
    url = f"{srv.url}/v1/chat/completions"
    base = {"messages": MSG, "max_tokens": 4}
    ok = httpx.post(url, json={**base, "model": "alpha", "rerank": {"candidates": 2, "heads": ["alpha_head"]}}, timeout=60)
    assert ok.status_code == 200, ok.text
    for model, head in (("alpha", "base_head"), (backbone.name, "alpha_head")):
        r = httpx.post(url, json={**base, "model": model, "rerank": {"candidates": 2, "heads": [head]}}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "head_adapter_mismatch", r.text
    r = httpx.post(f"{srv.url}/v1/score", json={"model": "alpha", "messages": MSG, "candidates": ["Apple."],
                                                "heads": ["alpha_head"]}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "alpha"


def test_admin_loads_and_unloads_adapters(served):
    srv, engine = served
    h = {"Authorization": f"Bearer {ADMIN}"}
    r = httpx.post(f"{srv.url}/v1/admin/adapters", json={"name": "beta", "path": "beta"}, headers=h, timeout=60)
    assert r.status_code == 200 and r.json()["id"] == "beta", r.text
    assert "beta" in [m["id"] for m in httpx.get(f"{srv.url}/v1/models").json()["data"]]
    assert _greedy(srv, "beta")
    for body, code in (({"name": "beta", "path": "beta"}, 409), ({"name": "x", "path": "../alpha"}, 400),
                       ({"name": "x", "path": "nope"}, 400)):
        assert httpx.post(f"{srv.url}/v1/admin/adapters", json=body, headers=h, timeout=60).status_code == code
    assert httpx.delete(f"{srv.url}/v1/admin/adapters/beta", headers=h, timeout=60).status_code == 200
    r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": "beta", "messages": MSG, "max_tokens": 2}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.delete(f"{srv.url}/v1/admin/adapters/beta", headers=h, timeout=60).status_code == 404


def test_batches_are_formed_per_adapter(served, backbone):
    import concurrent.futures as cf

    srv, engine = served
    seen = []
    real = engine.generate

    def spy(jobs, **kw):
        seen.append({j.adapter for j in jobs})
        return real(jobs, **kw)

    engine.generate = spy
    try:
        with cf.ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda m: _greedy(srv, m), ["alpha", backbone.name, "alpha", backbone.name]))
    finally:
        engine.generate = real
    assert all(outs) and all(len(s) == 1 for s in seen)


def test_delete_under_steady_traffic_on_the_adapter_returns(served):
    """Continuous batching keeps one batch alive while requests for its adapter keep coming; DELETE stops new ones
    joining it, so the batch drains and the unload goes through within its bound (ARBITER_ADAPTER_UNLOAD_WAIT_S)."""
    import threading
    import time

    srv, engine = served
    h = {"Authorization": f"Bearer {ADMIN}"}
    r = httpx.post(f"{srv.url}/v1/admin/adapters", json={"name": "gamma", "path": "alpha"}, headers=h, timeout=60)
    assert r.status_code == 200, r.text
    stop = threading.Event()
    statuses: list[tuple[float, int, str]] = []

    def traffic() -> None:
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                r = c.post(f"{srv.url}/v1/chat/completions",
                           json={"model": "gamma", "messages": MSG, "max_tokens": 24, "temperature": 1.0})
                statuses.append((time.monotonic(), r.status_code, r.json().get("error", {}).get("code", "")))

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while sum(1 for _, s, _ in statuses if s == 200) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = time.monotonic()
        r = httpx.delete(f"{srv.url}/v1/admin/adapters/gamma", headers=h, timeout=120)
        took = time.monotonic() - t0
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert r.status_code == 200, (r.status_code, r.text, took)
    assert took < 30, took  # within the default bound: the batch drained instead of timing out
    assert {s for _, s, _ in statuses} <= {200, 404}, statuses
    late = [(s, code) for at, s, code in statuses if at > t0 + took + 0.5]
    assert late and all(s == 404 and code == "model_not_found" for s, code in late), late
