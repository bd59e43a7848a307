"""The official ``openai`` client against a live ``arbiter serve`` process on the real SmolLM2-135M.

One server for the whole module: started as a subprocess (the real CLI, settings from ARBITER_* variables,
the model loaded in the background while /health says 503), with three heads on disk (identity on the
final norm, affine-tanh, and SwiGLU-tanh on block 12) and an admin key. Rewards reported by the server are
checked against the heads applied in this process to a standalone forward of the same text.
Generations are kept to 8 tokens so the file stays fast on two CPU cores.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch

from arbiter.backbone import forward_features, prompt_ids
from arbiter.heads import load_head
from arbiter.testing.fakes import ArbiterProcess, save_random_head

BLOCK = 12
ADMIN = "admin-secret"
MSGS = [{"role": "user", "content": "Give me a short tip for learning to cook."}]
HEADS = ["h1", "h2", "h3"]


@dataclass
class Live:
    url: str
    model: str
    heads_dir: Path
    proc: subprocess.Popen
    log: Path

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120, **kw)

    def admin(self, method: str, path: str, key: str | None = ADMIN, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.request(method, f"{self.url}/v1/admin/heads{path}", headers=headers, timeout=60, **kw)


# One intra-op torch thread for the whole module (shared fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def live(backbone, tmp_path_factory):
    fp = backbone.fingerprint
    root = tmp_path_factory.mktemp("live_heads")
    save_random_head(fp, root / "h1", name="h1", seed=1)
    save_random_head(fp, root / "h2", name="h2", pooler="affine_tanh", seed=2)
    save_random_head(fp, root / "h3", name="h3", pooler="swiglu_tanh", layer=BLOCK, ffn_size=backbone.ffn_size, seed=3)
    # Not loaded at start-up (no head_config.json directly under staging/): for the admin API.
    save_random_head(fp, root / "staging" / "alt", name="alt", seed=4)
    broken = root / "staging" / "broken"
    save_random_head(fp, broken, name="broken", seed=5)
    (broken / "head.safetensors").write_bytes(b"not safetensors")

    with ArbiterProcess(root, root.parent / "server.log", env={"ARBITER_ADMIN_KEY": ADMIN}) as srv:
        yield Live(srv.url, backbone.name, root, srv.proc, srv.log)


@pytest.fixture(scope="module")
def local_heads(live, backbone):
    """The same heads, loaded in this process for reference rewards: name -> (module, config)."""
    return {name: load_head(live.heads_dir / path, expected_backbone=backbone.fingerprint)
            for name, path in {"h1": "h1", "h2": "h2", "h3": "h3", "alt": "staging/alt"}.items()}


def reference_rewards(backbone, local_heads, messages, text: str, names) -> dict[str, float]:
    """Heads applied to a standalone forward over prompt + text + <|im_end|> (the score path, rebuilt here)."""
    ids = (prompt_ids(backbone.tokenizer, messages) + backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
           + [backbone.end_id])
    seq = torch.tensor([ids])  # [1, T]
    pos = torch.tensor([len(ids) - 1])
    layers = {local_heads[n][1].layer for n in names}
    feats = {l: forward_features(backbone.model, seq, torch.ones_like(seq), pos, layer=l) for l in layers}  # l -> [1, d]
    with torch.no_grad():
        return {n: float(local_heads[n][0](feats[local_heads[n][1].layer])[0]) for n in names}


def faithful(backbone, text: str, completion_tokens: int) -> bool:
    """Whether re-tokenising the text most likely gives back the sampled tokens (same count, exact round trip)."""
    ids = backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
    return len(ids) == completion_tokens and backbone.tokenizer.decode(ids) == text


# --- ops endpoints --------------------------------------------------------------------------------------


def test_health_models_and_heads(live):
    h = httpx.get(f"{live.url}/health").json()
    assert h["status"] == "ok" and h["model"] == live.model and h["heads"] == HEADS and h["queue_depth"] == 0
    c = live.client()
    assert [m.id for m in c.models.list().data] == [live.model]
    assert c.models.retrieve(live.model).id == live.model
    with pytest.raises(openai.NotFoundError) as ei:
        c.models.retrieve("gpt-4")
    assert ei.value.body["param"] == "model"
    heads = httpx.get(f"{live.url}/v1/heads").json()
    assert heads["default"] == "h1"
    assert [(d["id"], d["pooler"], d["layer"]) for d in heads["data"]] == [
        ("h1", "identity", -1), ("h2", "affine_tanh", -1), ("h3", "swiglu_tanh", BLOCK)]
    assert all(d["backbone"] == live.model for d in heads["data"])


# --- plain completions --------------------------------------------------------------------------------


def test_plain_completion_and_usage(live, backbone):
    r = live.client().chat.completions.create(model=live.model, messages=MSGS, max_tokens=8, seed=7)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == live.model
    assert r.system_fingerprint.startswith("arbiter-")
    assert len(r.choices) == 1 and r.choices[0].index == 0 and r.choices[0].message.role == "assistant"
    ch = r.choices[0]
    assert ch.finish_reason in {"stop", "length"} and ch.message.content
    u = r.usage
    assert u.prompt_tokens == len(prompt_ids(backbone.tokenizer, MSGS))
    assert 1 <= u.completion_tokens <= 8 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    if ch.finish_reason == "length":
        assert u.completion_tokens == 8
    assert not hasattr(r, "rerank") or r.rerank is None


def test_seed_determinism_and_streaming(live):
    c = live.client()
    a = c.chat.completions.create(model=live.model, messages=MSGS, max_tokens=8, seed=123)
    b = c.chat.completions.create(model=live.model, messages=MSGS, max_tokens=8, seed=123)
    assert a.choices[0].message.content == b.choices[0].message.content
    other = c.chat.completions.create(model=live.model, messages=MSGS, max_tokens=8, seed=124)
    assert other.choices[0].message.content != a.choices[0].message.content

    # The same seed streamed: the deltas add up to the same text; include_usage adds a final usage chunk.
    chunks = list(c.chat.completions.create(model=live.model, messages=MSGS, max_tokens=8, seed=123, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == a.choices[0].message.content
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) >= 2  # really streamed
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert [f.choices[0].finish_reason for f in finals] == [a.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}) \
        == a.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})
    assert len({ch.id for ch in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_unknown_openai_fields_are_accepted(live):
    r = live.client().chat.completions.create(
        model=live.model, messages=MSGS, max_tokens=4, seed=1, user="someone",
        extra_body={"logit_bias": {}, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False,
                    "a_field_from_the_future": {"x": 1}})
    assert r.choices[0].message.content and r.usage.completion_tokens <= 4


# --- rerank ---------------------------------------------------------------------------------------------


RERANK = {"candidates": 4, "heads": HEADS, "return_candidates": True}


@pytest.fixture(scope="module")
def reranked(live):
    return live.client().chat.completions.create(model=live.model, messages=MSGS, max_tokens=8, seed=11,
                                                 extra_body={"rerank": RERANK})


def test_rerank_picks_the_argmax_of_the_first_head(reranked):
    info = reranked.rerank
    cands = info["candidates"]
    assert info["heads"] == HEADS and info["candidates_scored"] == 4 and len(cands) == 4
    assert [c["index"] for c in cands] == [0, 1, 2, 3]
    for c in cands:
        assert set(c["rewards"]) == set(HEADS) and all(isinstance(v, float) for v in c["rewards"].values())
        assert c["finish_reason"] in {"stop", "length"} and 1 <= c["completion_tokens"] <= 8
    first = [c["rewards"]["h1"] for c in cands]
    best = max(range(4), key=lambda i: (first[i], -i))
    assert info["chosen"] == [best]
    assert info["rewards"] == [first[best]]
    assert reranked.choices[0].message.content == cands[best]["text"]
    assert reranked.choices[0].finish_reason == cands[best]["finish_reason"]
    assert reranked.usage.completion_tokens == sum(c["completion_tokens"] for c in cands)
    assert len({c["text"] for c in cands}) > 1  # four different samples, not one repeated


def test_rerank_rewards_equal_the_heads_on_a_standalone_forward(reranked, backbone, local_heads):
    checked = 0
    for c in reranked.rerank["candidates"]:
        if not faithful(backbone, c["text"], c["completion_tokens"]):
            continue  # the text re-tokenises differently: a standalone forward would see other tokens
        want = reference_rewards(backbone, local_heads, MSGS, c["text"], HEADS)
        for n in HEADS:
            assert c["rewards"][n] == pytest.approx(want[n], rel=1e-4, abs=2e-4), (n, c["text"])  # measured: ~5e-6
        checked += 1
    assert checked >= 2, "too few candidates whose text re-tokenises to the sampled tokens"


def test_rerank_stream_returns_the_winner(live, reranked):
    # Same seed, same candidates: the streamed winner is the non-streamed winner.
    chunks = list(live.client().chat.completions.create(
        model=live.model, messages=MSGS, max_tokens=8, seed=11, stream=True, extra_body={"rerank": RERANK}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == reranked.choices[0].message.content
    final = next(ch for ch in chunks if ch.choices and ch.choices[0].finish_reason)
    assert final.rerank["chosen"] == reranked.rerank["chosen"]
    assert [c["text"] for c in final.rerank["candidates"]] == [c["text"] for c in reranked.rerank["candidates"]]


def test_offline_bestofn_samples_and_picks_what_the_server_returns(live, backbone, tmp_path):
    """``arbiter eval bestofn`` problem j == a rerank request with seed + j: the same candidates, rewards and pick."""
    from arbiter.training.data import load_math, math_prompt
    from arbiter.training.evaluate import eval_bestofn

    rep = eval_bestofn(head=str(live.heads_dir / "h1"), data="svamp", n=3, limit=2, seed=40, max_new_tokens=8,
                       temperature=0.9, out=str(tmp_path), backbone=backbone, progress=False)
    ex = json.loads(open(rep["paths"]["json"]).read())["examples"]
    problems, _ = load_math("svamp", limit=2, seed=40)
    for j, (problem, e) in enumerate(zip(problems, ex)):
        r = live.client().chat.completions.create(
            model=live.model, messages=math_prompt(problem), max_tokens=8, temperature=0.9, seed=40 + j,
            extra_body={"rerank": {"candidates": 3, "heads": ["h1"], "return_candidates": True}})
        cands = r.rerank["candidates"]
        assert [c["text"] for c in cands] == e["texts"]
        assert [c["rewards"]["h1"] for c in cands] == pytest.approx(e["rewards"], rel=1e-3, abs=1e-3)
        assert r.rerank["chosen"] == [e["head_pick"]]


def test_score_endpoint(live, reranked, backbone, local_heads):
    texts = [c["text"] for c in reranked.rerank["candidates"]]
    body = {"model": live.model, "messages": MSGS, "candidates": texts + [texts[0]], "heads": HEADS}
    r = httpx.post(f"{live.url}/v1/score", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "score.list" and out["heads"] == HEADS and len(out["data"]) == 5
    rewards = [d["rewards"] for d in out["data"]]
    # The same text scored twice gets the same rewards.
    assert rewards[4] == pytest.approx(rewards[0], rel=1e-5, abs=1e-5)
    first = [x["h1"] for x in rewards]
    assert out["best"] == max(range(5), key=lambda i: (first[i], -i))
    for text, got in zip(texts, rewards):
        want = reference_rewards(backbone, local_heads, MSGS, text, HEADS)
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4), text  # measured: ~1e-5
    # Score and rerank agree wherever the text re-tokenises to the sampled tokens.
    agree = 0
    for c, got in zip(reranked.rerank["candidates"], rewards):
        if faithful(backbone, c["text"], c["completion_tokens"]):
            assert got == pytest.approx(c["rewards"], rel=1e-4, abs=2e-4)
            agree += 1
    assert agree >= 2
    p = len(prompt_ids(backbone.tokenizer, MSGS))
    assert out["usage"]["prompt_tokens"] == sum(p + len(backbone.tokenizer(t)["input_ids"]) + 1 for t in texts + [texts[0]])


# --- errors ----------------------------------------------------------------------------------------------


def _error(exc_type, call, *, status: int, param=None, code=None, type_=None) -> dict:
    with pytest.raises(exc_type) as ei:
        call()
    e = ei.value
    assert e.status_code == status
    assert set(e.body) == {"message", "type", "param", "code"}, e.body
    assert e.body["message"] and "Traceback" not in e.body["message"]
    assert e.body["param"] == param, e.body
    if code is not None:
        assert e.body["code"] == code, e.body
    assert e.body["type"] == (type_ or ("not_found_error" if status == 404 else "invalid_request_error"))
    return e.body


def test_error_shapes_through_the_client(live):
    c = live.client()
    m = live.model

    def chat(**kw):
        kw.setdefault("messages", MSGS)
        kw.setdefault("max_tokens", 8)
        return lambda: c.chat.completions.create(model=kw.pop("model", m), **kw)

    _error(openai.NotFoundError, chat(model="gpt-4o"), status=404, param="model", code="model_not_found")
    _error(openai.BadRequestError, chat(n=9), status=400, param="n")
    _error(openai.BadRequestError, chat(max_tokens=513), status=400, param="max_tokens")
    _error(openai.BadRequestError, chat(max_tokens=None, max_completion_tokens=10_000), status=400,
           param="max_completion_tokens")
    _error(openai.BadRequestError, chat(messages=[]), status=400, param="messages")
    _error(openai.BadRequestError, chat(messages=[{"role": "user", "content": "   "}]), status=400, param="messages")
    # Wrong types and values out of range.
    _error(openai.BadRequestError, chat(temperature="hot"), status=400, param="temperature")
    _error(openai.BadRequestError, chat(temperature=3.5), status=400, param="temperature")
    _error(openai.BadRequestError, chat(extra_body={"max_tokens": "lots"}), status=400, param="max_tokens")
    _error(openai.BadRequestError, chat(messages=[{"role": "robot", "content": "hi"}]), status=400,
           param="messages.0.role")
    _error(openai.BadRequestError, chat(stop=["a", "b", "c", "d", "e"]), status=400, param="stop")
    _error(openai.BadRequestError, chat(n=0), status=400, param="n")
    # A prompt longer than the context (8192 tokens).
    long = [{"role": "user", "content": "hello " * 9000}]
    body = _error(openai.BadRequestError, chat(messages=long), status=400, param="messages",
                  code="context_length_exceeded")
    assert "8192" in body["message"]
    # Unknown head.
    body = _error(openai.NotFoundError, chat(extra_body={"rerank": {"heads": ["nope"]}}), status=404,
                  param="rerank.heads", code="head_not_found")
    assert "h1" in body["message"]  # names the heads that are loaded


def test_error_shapes_over_raw_http(live):
    url = f"{live.url}/v1/chat/completions"
    cases = [
        (httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400, "not valid JSON"),
        (httpx.post(url, content=b"[1, 2]", headers={"content-type": "application/json"}), 400, None),
        (httpx.post(url), 400, None),
        (httpx.get(url), 405, "not allowed"),
        (httpx.get(f"{live.url}/v2/nothing"), 404, "no route"),
        (httpx.post(f"{live.url}/v1/score", json={"model": live.model, "messages": MSGS, "candidates": ["x"],
                                                   "heads": ["nope"]}), 404, "nope"),
        (httpx.post(f"{live.url}/v1/score", json={"model": live.model, "messages": MSGS, "candidates": []}), 400, None),
    ]
    for r, status, text in cases:
        assert r.status_code == status, (r.request.url, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        if text:
            assert text in err["message"], err


# --- metrics ---------------------------------------------------------------------------------------------


def _samples(url: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text) for s in fam.samples}


def test_metrics(live):
    chat_ok = ("arbiter_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))
    before = _samples(live.url)
    live.client().chat.completions.create(model=live.model, messages=MSGS, max_tokens=2,
                                          extra_body={"rerank": {"candidates": 2, "heads": ["h1"]}})
    after = _samples(live.url)
    assert after[chat_ok] == before.get(chat_ok, 0) + 1
    scored = ("arbiter_candidates_scored_total", ())
    assert after[scored] == before.get(scored, 0) + 2
    assert after[("arbiter_heads_loaded", ())] == 3
    text = httpx.get(f"{live.url}/metrics").text
    assert "arbiter_requests" in text and "arbiter_candidates_scored" in text


# --- admin -----------------------------------------------------------------------------------------------


def _score(live, head: str) -> float:
    r = httpx.post(f"{live.url}/v1/score", timeout=60,
                   json={"model": live.model, "messages": MSGS, "candidates": ["Taste as you go."], "heads": [head]})
    assert r.status_code == 200, r.text
    return r.json()["data"][0]["rewards"][head]


def test_admin_load_swap_unload(live, backbone, local_heads):
    assert live.admin("POST", "", key=None, json={"path": "staging/alt"}).status_code == 401
    r = live.admin("POST", "", key="wrong", json={"path": "staging/alt"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"

    r = live.admin("POST", "", json={"path": "staging/alt"})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "alt" and r.json()["pooler"] == "identity"
    assert [d["id"] for d in httpx.get(f"{live.url}/v1/heads").json()["data"]] == ["alt", *HEADS]
    alt = _score(live, "alt")
    assert alt == pytest.approx(reference_rewards(backbone, local_heads, MSGS, "Taste as you go.", ["alt"])["alt"], rel=1e-4, abs=1e-4)
    r = live.admin("POST", "", json={"path": "staging/alt"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "head_exists"

    # Paths outside the heads directory are refused.
    for bad in ["../outside", "/etc", "staging/../../x"]:
        r = live.admin("POST", "", json={"path": bad, "name": "evil"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_head", (bad, r.text)

    # A failed swap leaves the old head serving.
    r = live.admin("PUT", "/alt", json={"path": "staging/broken"})
    assert r.status_code == 400 and "safetensors" in r.json()["error"]["message"]
    heads = {d["id"]: d for d in httpx.get(f"{live.url}/v1/heads").json()["data"]}
    assert heads["alt"]["path"] == "staging/alt"  # relative to ARBITER_HEADS_DIR, never an absolute server path
    assert heads["h1"]["path"] == "h1"
    assert _score(live, "alt") == pytest.approx(alt, abs=1e-6)

    # A good swap: the name now scores with h2's weights.
    r = live.admin("PUT", "/alt", json={"path": "h2"})
    assert r.status_code == 200 and r.json()["pooler"] == "affine_tanh"
    assert _score(live, "alt") == pytest.approx(_score(live, "h2"), abs=1e-6)
    assert live.admin("PUT", "/missing", json={"path": "h2"}).status_code == 404

    r = live.admin("DELETE", "/alt")
    assert r.status_code == 200 and r.json() == {"id": "alt", "object": "head", "deleted": True}
    assert live.admin("DELETE", "/alt").status_code == 404
    assert [d["id"] for d in httpx.get(f"{live.url}/v1/heads").json()["data"]] == HEADS
    r = httpx.post(f"{live.url}/v1/score", json={"model": live.model, "messages": MSGS, "candidates": ["x"], "heads": ["alt"]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "head_not_found"


def test_a_late_short_request_joins_the_running_batch_and_returns_first(live):
    """Continuous batching: a short request sent while a long one decodes is answered before the long one ends."""
    import threading

    done: dict[str, float] = {}

    def call(name: str, max_tokens: int, prompt: str) -> None:
        live.client().chat.completions.create(model=live.model, messages=[{"role": "user", "content": prompt}],
                                              max_tokens=max_tokens, seed=3, n=2)
        done[name] = time.monotonic()

    def admitted() -> float:
        text = httpx.get(f"{live.url}/metrics", timeout=10).text
        return float(next(ln for ln in text.splitlines() if ln.startswith("arbiter_admitted_rows_total")).split()[-1])

    before = admitted()
    long = threading.Thread(target=call, args=("long", 200, "Write a very long story about the sea."))
    long.start()
    time.sleep(1.0)  # let the long request reach the engine
    while httpx.get(f"{live.url}/health", timeout=10).json()["queue_depth"] != 0:
        time.sleep(0.05)  # the long request has left the queue: it is decoding
    call("short", 4, "Hi")
    long.join(120)
    assert done["short"] < done["long"]
    assert admitted() - before == 2  # the short request's two rows joined the running batch


def test_server_shuts_down_cleanly(live):
    # Last test: SIGTERM shuts down gracefully and promptly, and a drained stop exits 0.
    live.proc.terminate()
    rc = live.proc.wait(60)
    log = live.log.read_text()
    assert rc == 0, log[-3000:]
    # Every request in this module was answered without a server-side error or traceback.
    assert "Traceback" not in log and '"level": "error"' not in log and '"level": "critical"' not in log, log[-3000:]
