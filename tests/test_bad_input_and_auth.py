"""Hardening, request side: every kind of bad input is a clear 4xx in OpenAI's error shape; head files given to
the admin API are untrusted (each refusal a 400, and a failed load or swap leaves the old head serving); the
API key and the admin key guard exactly the endpoints they should; prompts are not logged by default.

A scripted fake engine (``arbiter.testing.fakes``) stands in for the model: none of this needs real tokens. Requests go
over real HTTP to uvicorn on 127.0.0.1 so that body parsing, size limits and raw bytes are the server's own.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from arbiter.heads import BackboneFingerprint
from arbiter.testing.fakes import FAKE_FINGERPRINT, LOOPBACK, FakeEngine, save_random_head
from arbiter.testing.served import MODEL, assert_error, heads_dir, served

USER = [{"role": "user", "content": "hello there"}]
CHAT = "/v1/chat/completions"
SCORE = "/v1/score"
ADMIN = "/v1/admin/heads"
LIMITS = dict(max_n=2, max_candidates=3, max_tokens_limit=8, default_max_tokens=8, max_stop=2, max_stop_length=8,
              max_score_candidates=3, max_messages=4, max_body_bytes=4096)


def chat(**kw) -> dict:
    return {"model": MODEL, "messages": USER, "max_tokens": 4, **kw}


@pytest.fixture(scope="module")
def heads_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("heads")


@pytest.fixture(scope="module")
def srv(heads_root):
    """One server for the whole module: small limits, heads h1 and h2 loaded from files, admin enabled."""
    reg = heads_dir(heads_root, "h1", "h2")
    with served(FakeEngine(context_length=256), reg, heads_dir=str(heads_root), admin_key="adm", **LIMITS) as s:
        yield s


ADM = {"Authorization": "Bearer adm"}


def post(srv, path: str, body=None, *, raw: bytes | None = None, headers: dict | None = None, **kw) -> httpx.Response:
    if raw is not None:
        return httpx.post(srv.url + path, content=raw, headers={"content-type": "application/json", **(headers or {})},
                          timeout=20, **kw)
    return httpx.post(srv.url + path, json=body, headers=headers, timeout=20, **kw)


# --- 2. bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, in_message", [
    (b'{"model": "fake-backbone", "messages": [', "not valid JSON"),
    (b"{'model': 'single quotes'}", "not valid JSON"),
    (b"", "needs a JSON body"),
    (b"[1, 2, 3]", "valid dictionary"),
    (b'"just a string"', "valid dictionary"),
    (b"null", None),
    (b"[" * 2000 + b"]" * 2000, None),  # deep nesting (under the body limit): the parser's recursion limit, not a crash
])
def test_malformed_json_is_400(srv, raw, in_message):
    assert_error(post(srv, CHAT, raw=raw), 400, type_="invalid_request_error", in_message=in_message)


@pytest.mark.parametrize("raw", [
    b'{"model": "fake-backbone", "messages": [{"role": "user", "content": "caf\xe9"}]}',  # Latin-1, not UTF-8
    b"\xff\xfe\xfa\x00\x81garbage",
    b'{"model": "fake-backbone", "messages": [{"role": "user", "content": "\xc3\x28"}]}',  # invalid 2-byte sequence
])
def test_non_utf8_bytes_are_400(srv, raw):
    assert_error(post(srv, CHAT, raw=raw), 400, type_="invalid_request_error")
    assert_error(post(srv, SCORE, raw=raw), 400, type_="invalid_request_error")


@pytest.mark.parametrize("path, body, param", [
    (CHAT, chat(messages=[{"role": "user", "content": "a\ud800b"}]), "messages.0.content"),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]), "messages.0.content.0.text"),
    (CHAT, chat(stop=["ok", "\ud83d"]), "stop.1"),
    (CHAT, chat(stop="\ud83d"), "stop"),
    (SCORE, {"model": MODEL, "messages": USER, "candidates": ["fine", "\udc00"]}, "candidates.1"),
])
def test_lone_surrogates_are_400_not_a_tokenizer_crash(srv, path, body, param):
    # json.dumps writes "\ud800" escapes, which JSON allows and Python decodes to an unencodable str.
    err = assert_error(post(srv, path, raw=json.dumps(body).encode()), 400, type_="invalid_request_error", param=param)
    assert "surrogate" in err["message"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_wrong_content_type_is_400(srv, content_type):
    r = httpx.post(srv.url + CHAT, content=json.dumps(chat()).encode(), headers={"content-type": content_type})
    assert_error(r, 400, type_="invalid_request_error")


@pytest.mark.parametrize("body, param", [
    (chat(messages="hello"), "messages"),
    (chat(messages=[["user", "hi"]]), "messages.0"),
    (chat(n="two"), "n"),
    (chat(max_tokens=1.5), "max_tokens"),
    (chat(max_tokens="many"), "max_tokens"),
    (chat(temperature="hot"), "temperature"),
    (chat(top_p=[1]), "top_p"),
    (chat(stop=5), "stop"),
    (chat(stream={"yes": True}), "stream"),
    (chat(seed=2**70), "seed"),
    (chat(model=7), "model"),
    (chat(rerank="h1"), "rerank"),
    (chat(rerank={"candidates": "three"}), "rerank.candidates"),
    (chat(messages=[{"role": "user", "content": 5}]), "messages.0.content"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]), "messages.0.content"),
])
def test_wrong_types_are_400_naming_the_field(srv, body, param):
    err = assert_error(post(srv, CHAT, body), 400, type_="invalid_request_error")
    assert err["param"] is not None and err["param"].startswith(param), err


@pytest.mark.parametrize("messages, param", [
    (None, "messages"),  # missing
    ([], "messages"),
    ([{"role": "user", "content": ""}], "messages"),
    ([{"role": "user", "content": "   "}], "messages"),
    ([{"role": "system", "content": "only a system prompt"}], "messages"),
    ([{"role": "assistant", "content": "no user at all"}], "messages"),
    ([{"role": "user"}], "messages"),  # content missing: empty
    ([{"content": "no role"}], "messages.0.role"),
    ([{"role": "tool", "content": "x", "tool_call_id": "c"}], "messages"),  # a tool result, but no user turn
    ([{"role": "wizard", "content": "x"}], "messages.0.role"),
    ([{"role": "USER", "content": "x"}], "messages.0.role"),
    ([{"role": "user", "content": "x"}] * 5, "messages"),  # over max_messages (4)
])
def test_missing_empty_and_unknown_role_messages_are_400(srv, messages, param):
    body = chat() if messages is None else chat(messages=messages)
    if messages is None:
        del body["messages"]
    assert_error(post(srv, CHAT, body), 400, type_="invalid_request_error", param=param)
    score = {"model": MODEL, "candidates": ["a"], **({} if messages is None else {"messages": messages})}
    assert_error(post(srv, SCORE, score), 400, type_="invalid_request_error", param=param)


def test_prompt_beyond_the_context_window_is_400(srv):
    # The fake engine's context is 256 tokens (one per character): prompt + max_tokens + 1 must fit.
    long = [{"role": "user", "content": "x" * 300}]
    assert_error(post(srv, CHAT, chat(messages=long)), 400, code="context_length_exceeded", param="messages",
                 in_message="context is 256 tokens")
    fits = [{"role": "user", "content": "x" * 100}]
    assert post(srv, CHAT, chat(messages=fits)).status_code == 200
    # The answer budget counts too: a prompt that fits alone is refused when the score candidate does not.
    r = post(srv, SCORE, {"model": MODEL, "messages": fits, "candidates": ["y" * 200]})
    assert_error(r, 400, code="context_length_exceeded")


@pytest.mark.parametrize("body, param", [
    (chat(n=0), "n"),
    (chat(n=-1), "n"),
    (chat(n=3), "n"),  # max_n 2
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_tokens=9), "max_tokens"),  # max_tokens_limit 8
    (chat(max_tokens=10**30), "max_tokens"),
    (chat(max_completion_tokens=9), "max_completion_tokens"),
    (chat(temperature=-0.01), "temperature"),
    (chat(temperature=2.01), "temperature"),
    (chat(top_p=-0.1), "top_p"),
    (chat(top_p=1.01), "top_p"),
    (chat(stop=["a", "b", "c"]), "stop"),  # max_stop 2
    (chat(stop=["x" * 9]), "stop"),  # max_stop_length 8
    (chat(stop=[""]), "stop"),
    (chat(stop=""), "stop"),
    (chat(rerank={"candidates": 0}), "rerank.candidates"),
    (chat(rerank={"candidates": 4}), "rerank.candidates"),  # max_candidates 3
    (chat(n=2, rerank={"candidates": 1}), "rerank.candidates"),  # fewer candidates than choices
    (chat(rerank={"heads": []}), "rerank.heads"),
    (chat(rerank={"heads": ["h1", "h1"]}), "rerank.heads"),  # duplicate heads
    (chat(rerank={"unknown_option": 1}), "rerank.unknown_option"),
    (chat(logit_bias={"01": 1.0}), "logit_bias"),  # aliases of token 1 are refused, not merged
    (chat(logit_bias={"+1": 1.0}), "logit_bias"),
    (chat(logit_bias={" 1": 1.0}), "logit_bias"),
    (chat(logit_bias={str(i): 1.0 for i in range(301)}), "logit_bias"),  # ARBITER_MAX_LOGIT_BIAS 300
])
def test_out_of_range_values_are_400(srv, body, param):
    assert_error(post(srv, CHAT, body), 400, type_="invalid_request_error", param=param)


def test_logit_bias_at_the_cap_and_duplicate_budget_headers(srv):
    assert post(srv, CHAT, chat(logit_bias={str(i): 1.0 for i in range(300)} | {"0": -1.0})).status_code == 200
    r = httpx.post(srv.url + CHAT, json=chat(rerank={"candidates": 2}), timeout=20,
                   headers=[("X-Arbiter-Budget", "candidates=2"), ("X-Arbiter-Budget", "candidates=1")])
    assert_error(r, 400, param="X-Arbiter-Budget")


def test_deeply_nested_json_in_a_candidate_is_no_answer():
    from arbiter.answers import extract_json_field

    assert extract_json_field('{"a": ' * 5000 + "1" + "}" * 5000, "a") is None


@pytest.mark.parametrize("raw", [b'{"temperature": NaN}', b'{"temperature": Infinity}', b'{"top_p": -Infinity}'])
def test_non_finite_numbers_are_400(srv, raw):
    # Python's JSON parser accepts these non-standard literals; they must still not reach the sampler.
    body = json.loads(raw)
    text = json.dumps(chat(**body))  # keeps NaN / Infinity literals
    assert_error(post(srv, CHAT, raw=text.encode()), 400, type_="invalid_request_error", param=next(iter(body)))


@pytest.mark.parametrize("body", [
    {"model": MODEL, "messages": USER, "candidates": []},
    {"model": MODEL, "messages": USER, "candidates": ["a", "b", "c", "d"]},  # max_score_candidates 3
    {"model": MODEL, "messages": USER, "candidates": ["a"], "heads": []},
    {"model": MODEL, "messages": USER, "candidates": ["a"], "heads": ["h1", "h1"]},
    {"model": MODEL, "messages": USER, "candidates": "a"},
])
def test_score_out_of_range_is_400(srv, body):
    assert_error(post(srv, SCORE, body), 400, type_="invalid_request_error")


def test_unknown_model_and_unknown_head_are_404(srv):
    assert_error(post(srv, CHAT, chat(model="gpt-4o")), 404, type_="not_found_error", code="model_not_found",
                 param="model", in_message="fake-backbone")
    assert_error(post(srv, SCORE, {"model": "nope", "messages": USER, "candidates": ["a"]}), 404, code="model_not_found")
    assert_error(httpx.get(srv.url + "/v1/models/gpt-4o"), 404, code="model_not_found")
    assert_error(post(srv, CHAT, chat(rerank={"heads": ["h1", "ghost"]})), 404, code="head_not_found",
                 param="rerank.heads", in_message="ghost")
    assert_error(post(srv, CHAT, chat(rerank={"head": "ghost"})), 404, code="head_not_found")
    assert_error(post(srv, SCORE, {"model": MODEL, "messages": USER, "candidates": ["a"], "heads": ["ghost"]}), 404,
                 code="head_not_found", param="heads")


def test_huge_bodies_are_413_by_header_and_while_streaming_in(srv):
    big = chat(messages=[{"role": "user", "content": "x" * 8000}])  # max_body_bytes 4096
    assert_error(post(srv, CHAT, big), 413, code="body_too_large", in_message="4096")
    assert_error(post(srv, SCORE, {"model": MODEL, "messages": USER, "candidates": ["y" * 8000]}), 413)

    def chunks():  # no Content-Length: chunked transfer encoding, counted as it arrives
        yield b'{"model": "fake-backbone", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"z" * 1000
        yield b'"}]}'

    r = httpx.post(srv.url + CHAT, content=chunks(), headers={"content-type": "application/json"}, timeout=20)
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_error(r, 413, code="body_too_large")
    # A Content-Length over the limit is refused from the header alone, before any body byte is sent.
    with socket.create_connection((LOOPBACK, srv.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000000\r\n\r\n")
        head = b""
        while b"}}" not in head:  # status line, headers, then the JSON error body
            chunk = sock.recv(65536)
            if not chunk:
                break
            head += chunk
        head = head.decode("latin-1")
    assert head.startswith("HTTP/1.1 413"), head[:200]
    assert "body_too_large" in head


def test_unknown_routes_and_methods_keep_the_error_shape(srv):
    assert_error(httpx.get(srv.url + "/v1/nothing-here"), 404, type_="not_found_error", code="unknown_route")
    assert_error(httpx.get(srv.url + CHAT), 405, code="method_not_allowed")
    assert_error(httpx.delete(srv.url + "/v1/models"), 405)


def test_defaults_above_the_limits_are_capped_not_refused():
    # default_max_tokens (256) and default_candidates (4) above the limits: a request that sends neither
    # must be served within the limits, not refused for values it never sent.
    with served(FakeEngine(), heads=None, max_tokens_limit=3, max_candidates=2) as s:
        r = httpx.post(s.url + CHAT, json={"model": MODEL, "messages": USER}, timeout=20)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] == "length"
        assert len(r.json()["choices"][0]["message"]["content"]) == 3  # the fake tokenizer: 1 char = 1 token


def test_default_candidates_capped_at_max_candidates(tmp_path):
    reg = heads_dir(tmp_path, "h1")
    with served(FakeEngine(), reg, max_candidates=3) as s:  # default_candidates 4
        r = httpx.post(s.url + CHAT, json=chat(rerank={}), timeout=20)
        assert r.status_code == 200, r.text
        assert r.json()["rerank"]["candidates_scored"] == 3


def test_requests_that_fail_validation_never_reach_the_engine(heads_root):
    eng = FakeEngine(context_length=256)
    with served(eng, heads_dir(heads_root / "own", "h1"), **LIMITS) as s:
        for body in (chat(n=3), chat(temperature=5), chat(model="x"), chat(rerank={"heads": ["zz"]}),
                     chat(messages=[{"role": "user", "content": "x" * 400}])):
            assert httpx.post(s.url + CHAT, json=body, timeout=20).status_code in (400, 404, 413)
        assert eng.batches == [] and eng.feature_calls == []


# --- 3. head files are untrusted (admin API) --------------------------------------------------------------


def _scores(srv, head: str = "h1") -> list[float]:
    r = post(srv, SCORE, {"model": MODEL, "messages": USER, "candidates": ["alpha", "bravo", "x y z"], "heads": [head]})
    assert r.status_code == 200, r.text
    return [d["rewards"][head] for d in r.json()["data"]]


def _read(w: Path) -> dict:
    # Clone: load_file may map the file into memory, and rewriting a mapped file in place is a SIGBUS.
    return {k: v.clone() for k, v in load_file(str(w)).items()}


def _tamper(root: Path, name: str, how: str, outside: Path) -> str:
    """Make a bad head under ``root`` (or outside it) and return the path to send to the admin API."""
    d = root / name
    if how in ("traversal", "absolute", "symlink_dir"):
        target = outside / name
        save_random_head(FAKE_FINGERPRINT, target, name=name)
        if how == "traversal":
            return os.path.relpath(target, root)  # ../../...
        if how == "absolute":
            return str(target)
        os.symlink(target, d, target_is_directory=True)
        return name
    save_random_head(FAKE_FINGERPRINT, d, name=name)
    w, c = d / "head.safetensors", d / "head_config.json"
    if how == "symlink_file":
        real = outside / f"{name}.safetensors"
        w.rename(real)
        os.symlink(real, w)
    elif how == "pickle":
        state = _read(w)
        torch.save(state, str(w))  # a zip-pickle under the safetensors name
    elif how == "pickle_extra":
        torch.save({}, str(d / "pytorch_model.bin"))
    elif how == "code_extra":
        (d / "handler.py").write_text("import os\n")
    elif how == "wrong_shape":
        state = _read(w)
        state["reward.weight"] = torch.zeros(1, 3)
        save_file(state, str(w))
    elif how in ("nan", "inf"):
        state = _read(w)
        state["reward.weight"][0, 1] = float("nan") if how == "nan" else float("inf")
        save_file(state, str(w))
    elif how == "fingerprint":
        other = BackboneFingerprint(model_name="other-model", hidden_size=FAKE_FINGERPRINT.hidden_size,
                                    num_layers=3, vocab_hash="other-vocab-99")
        save_random_head(other, d, name=name)
    elif how == "format_version":
        cfg = json.loads(c.read_text())
        cfg["format_version"] = 99
        c.write_text(json.dumps(cfg))
    elif how == "config_not_json":
        c.write_bytes(b"\x80\x04not json")
    elif how == "garbage_weights":
        w.write_bytes(b"\xff" * 8 + b"garbage" * 40)  # a header length no file could hold
    elif how == "missing_weights":
        w.unlink()
    else:  # pragma: no cover
        raise ValueError(how)
    return name


BAD_HEADS = {
    "traversal": "outside the heads directory",
    "absolute": "relative path",
    "symlink_dir": "symlink",
    "symlink_file": "symlink",
    "pickle": "pickle",
    "pickle_extra": "unexpected files",
    "code_extra": "unexpected files",
    "wrong_shape": "shape",
    "nan": "nan or inf",
    "inf": "nan or inf",
    "fingerprint": "another backbone",
    "format_version": "format_version",
    "config_not_json": "not valid json",
    "garbage_weights": "not a valid safetensors",
    "missing_weights": "missing head.safetensors",
}


@pytest.mark.parametrize("how", sorted(BAD_HEADS))
def test_bad_head_files_are_refused_with_400_and_the_old_head_keeps_serving(srv, heads_root, tmp_path, how):
    before = _scores(srv)
    listed = httpx.get(srv.url + "/v1/heads").json()
    path = _tamper(heads_root, f"bad_{how}", how, tmp_path)
    r = httpx.post(srv.url + ADMIN, json={"path": path, "name": "new"}, headers=ADM, timeout=20)
    assert_error(r, 400, type_="invalid_request_error", code="invalid_head", param="path", in_message=BAD_HEADS[how])
    r = httpx.put(srv.url + ADMIN + "/h1", json={"path": path}, headers=ADM, timeout=20)
    assert_error(r, 400, code="invalid_head", in_message=BAD_HEADS[how])
    # Nothing changed: same heads, same files, same rewards.
    assert httpx.get(srv.url + "/v1/heads").json() == listed
    assert _scores(srv) == before


@pytest.mark.parametrize("path, in_message", [
    ("nope", "no such head directory"),
    (".", "sub-directory"),
    ("", None),
    ("a" * 300, "cannot read"),  # a name too long for the file system (was a 500)
    ("a/" * 200 + "b", None),
    ("x\x00y", "relative path"),
    ("../" * 30 + "etc", "outside"),
    ("h1/../../", "outside"),
])
def test_bad_head_paths_are_400(srv, path, in_message):
    r = httpx.post(srv.url + ADMIN, json={"path": path, "name": "new"}, headers=ADM, timeout=20)
    assert_error(r, 400, type_="invalid_request_error", in_message=in_message)
    r = httpx.put(srv.url + ADMIN + "/h1", json={"path": path}, headers=ADM, timeout=20)
    assert_error(r, 400, in_message=in_message)
    assert sorted(h["id"] for h in httpx.get(srv.url + "/v1/heads").json()["data"]) == ["h1", "h2"]


def test_admin_load_swap_unload_over_http(tmp_path):
    reg = heads_dir(tmp_path, "h1", "h2")
    save_random_head(FAKE_FINGERPRINT, tmp_path / "h1_v2", name="h1", seed=7, scale=20.0)
    with served(FakeEngine(), reg, heads_dir=str(tmp_path), admin_key="adm") as s:
        v1 = _scores(s)
        # Loading a second head under a name in use is a conflict, not a silent replace.
        assert_error(httpx.post(s.url + ADMIN, json={"path": "h1_v2"}, headers=ADM), 409, code="head_exists")
        assert_error(httpx.post(s.url + ADMIN, json={"path": "h2", "name": "h1"}, headers=ADM), 409, code="head_exists")
        # Under a new name it loads; a swap replaces h1's weights.
        assert httpx.post(s.url + ADMIN, json={"path": "h1_v2", "name": "h1b"}, headers=ADM).status_code == 200
        assert _scores(s, "h1b") != v1
        r = httpx.put(s.url + ADMIN + "/h1", json={"path": "h1_v2"}, headers=ADM)
        assert r.status_code == 200 and r.json()["id"] == "h1"
        assert _scores(s) == _scores(s, "h1b")
        assert_error(httpx.put(s.url + ADMIN + "/ghost", json={"path": "h2"}, headers=ADM), 404, code="head_not_found")
        assert httpx.delete(s.url + ADMIN + "/h1b", headers=ADM).json() == {"id": "h1b", "object": "head", "deleted": True}
        assert_error(httpx.delete(s.url + ADMIN + "/h1b", headers=ADM), 404, code="head_not_found")
        assert_error(post(s, SCORE, {"model": MODEL, "messages": USER, "candidates": ["a"], "heads": ["h1b"]}), 404)
        # Unknown fields in admin bodies are refused (a typo must not load the wrong thing silently).
        assert_error(httpx.post(s.url + ADMIN, json={"path": "h2", "nmae": "x"}, headers=ADM), 400, param="nmae")


# --- 4. access control ------------------------------------------------------------------------------------

INFERENCE = [
    ("GET", "/v1/models", None),
    ("GET", f"/v1/models/{MODEL}", None),
    ("POST", CHAT, chat()),
    ("POST", SCORE, {"model": MODEL, "messages": USER, "candidates": ["a"]}),
    ("GET", "/v1/heads", None),
]
ADMIN_CALLS = [
    ("POST", ADMIN, {"path": "h2", "name": "h3"}),
    ("PUT", ADMIN + "/h2", {"path": "h2"}),
    ("DELETE", ADMIN + "/h3", None),
]


def _call(s, method, path, body, key=None, scheme="Bearer"):
    headers = {"Authorization": f"{scheme} {key}".strip()} if key is not None else {}
    return httpx.request(method, s.url + path, json=body, headers=headers, timeout=20)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    root = tmp_path_factory.mktemp("keyed")
    with served(FakeEngine(), heads_dir(root, "h1", "h2"), heads_dir=str(root), api_key="user-key-1",
                admin_key="admin-key-1") as s:
        yield s


@pytest.mark.parametrize("method, path, body", INFERENCE)
def test_inference_endpoints_need_the_api_key(keyed, method, path, body):
    assert_error(_call(keyed, method, path, body), 401, type_="authentication_error", code="missing_api_key")
    for wrong, scheme in [("wrong", "Bearer"), ("user-key-", "Bearer"), ("user-key-12", "Bearer"),
                          ("USER-KEY-1", "Bearer"), ("user-key-1", "Basic"), ("", "Bearer")]:
        r = _call(keyed, method, path, body, wrong, scheme)
        assert_error(r, 401, type_="authentication_error")
    assert _call(keyed, method, path, body, "user-key-1").status_code == 200
    assert _call(keyed, method, path, body, "user-key-1", scheme="bearer").status_code == 200
    assert _call(keyed, method, path, body, "admin-key-1").status_code == 200  # the admin key is a superset


@pytest.mark.parametrize("method, path, body", ADMIN_CALLS)
def test_admin_endpoints_need_the_admin_key(keyed, method, path, body):
    # Make the admin-key call below meaningful on its own: h3 absent before a load, present before a delete.
    if method == "POST":
        _call(keyed, "DELETE", ADMIN + "/h3", None, "admin-key-1")
    elif method == "DELETE":
        _call(keyed, "POST", ADMIN, {"path": "h2", "name": "h3"}, "admin-key-1")
    assert_error(_call(keyed, method, path, body), 401, type_="authentication_error")
    assert_error(_call(keyed, method, path, body, "nope"), 401, type_="authentication_error")
    assert_error(_call(keyed, method, path, body, "user-key-1"), 403, type_="permission_error", code="not_admin")
    assert _call(keyed, method, path, body, "admin-key-1").status_code == 200


def test_admin_is_404_when_disabled_even_with_keys():
    with served(FakeEngine(), api_key="user-key-1") as s:
        for method, path, body in ADMIN_CALLS:
            for key in (None, "user-key-1", "anything"):
                assert_error(_call(s, method, path, body, key), 404, code="admin_disabled")


def test_health_and_metrics_are_open(keyed):
    h = httpx.get(keyed.url + "/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    m = httpx.get(keyed.url + "/metrics")
    assert m.status_code == 200 and "arbiter_queue_depth" in m.text
    assert httpx.get(keyed.url + "/openapi.json").status_code == 200


def test_errors_never_echo_the_keys(keyed):
    for key in ("user-key-1x", "admin-key-1x"):
        r = _call(keyed, "POST", CHAT, chat(), key)
        assert "key-1" not in r.text
        r = _call(keyed, "DELETE", ADMIN + "/h1", None, key)
        assert "key-1" not in r.text


# --- what is logged ---------------------------------------------------------------------------------------


def test_prompts_and_answers_are_not_logged_by_default(srv, caplog):
    secret = "my-secret-prompt-4242"
    with caplog.at_level(logging.DEBUG):
        assert post(srv, CHAT, chat(messages=[{"role": "user", "content": secret}])).status_code == 200
        assert post(srv, SCORE, {"model": MODEL, "messages": [{"role": "user", "content": secret}],
                                 "candidates": [secret + "-answer"]}).status_code == 200
    access = [r for r in caplog.records if r.name == "arbiter.access"]
    assert len(access) >= 2, "the access log should still record the requests"
    assert all(secret not in r.getMessage() for r in caplog.records)


def test_log_prompts_opt_in_logs_them(caplog):
    with served(FakeEngine(), log_prompts=True) as s, caplog.at_level(logging.INFO):
        assert post(s, CHAT, chat(messages=[{"role": "user", "content": "opt-in-text-77"}])).status_code == 200
    assert any("opt-in-text-77" in r.getMessage() for r in caplog.records if r.name == "arbiter.access")


def test_unknown_field_names_are_logged_bounded(srv, caplog):
    extra = {f"field_{k}_" + "x" * 100: 1 for k in range(25)}  # under the 4096-byte body limit
    with caplog.at_level(logging.INFO):
        assert post(srv, CHAT, chat(**extra)).status_code == 200  # unknown OpenAI fields are ignored, not refused
    lines = [r.getMessage() for r in caplog.records if "ignoring unsupported fields" in r.getMessage()]
    assert len(lines) == 1 and len(lines[0]) < 1000 and "+15 more" in lines[0], lines


def test_blank_key_variables_mean_no_key(monkeypatch):
    # docker-compose passes ARBITER_API_KEY=${ARBITER_API_KEY:-}: an empty value must not become the key "".
    from arbiter.service.settings import Settings

    monkeypatch.setenv("ARBITER_API_KEY", "")
    monkeypatch.setenv("ARBITER_ADMIN_KEY", "  ")
    s = Settings()
    assert s.api_key is None and s.admin_key is None
    monkeypatch.setenv("ARBITER_API_KEY", "k1")
    assert Settings().api_key.get_secret_value() == "k1"
