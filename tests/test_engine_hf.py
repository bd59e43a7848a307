"""The HF engine on the real SmolLM2-135M: the feature it captures inside its decode loop (one extra step
feeding ``<|im_end|>``) equals a standalone forward over the same tokens (docs/architecture.md "One feature path"),
for candidates that sampled ``<|im_end|>``, were cut by ``max_tokens``, or were cut by a stop string; and
sampling is seed-deterministic.

One mixed generation batch (prompts of different lengths, so left padding is exercised; features on the
final norm and on block 12) is shared by most tests to keep the file fast on two CPU cores.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from arbiter.backbone import forward_features, prompt_ids
from arbiter.generation.base import GenerationJob, SamplingParams
from arbiter.generation.hf import HFEngine

BLOCK = 12


# One intra-op torch thread for the whole module (shared fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(backbone):
    return HFEngine(backbone)


def P(engine, text: str) -> list[int]:
    return prompt_ids(engine.tokenizer, [{"role": "user", "content": text}])


def standalone(engine, prompt: list[int], answer: list[int], layer: int) -> torch.Tensor:
    """Reference feature: one plain forward over prompt + answer + <|im_end|>, read at the last position; [d]."""
    seq = torch.tensor([prompt + answer + [engine.end_id]])  # [1, T]
    return forward_features(engine.model, seq, torch.ones_like(seq), torch.tensor([seq.shape[1] - 1]), layer=layer)[0]


def assert_same_feature(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    cos = F.cosine_similarity(got.float(), want.float(), dim=0).item()
    ratio = (got.norm() / want.norm()).item()
    assert cos > 0.9999 and abs(ratio - 1) < 1e-3, f"{what}: cos {cos:.6f}, norm ratio {ratio:.6f}"


@pytest.fixture(scope="module")
def mixed(engine):
    """One generate call over four jobs; returns (jobs, results, streamed deltas per job)."""
    deltas: dict[int, dict[int, list[str]]] = {3: {}}
    jobs = [
        # greedy, short answer: ends by sampling <|im_end|>
        GenerationJob(P(engine, "What is 2+2? Answer with just the number."), 1,
                      SamplingParams(max_tokens=16, temperature=0.0), feature_layers=(-1,)),
        # cut by max_tokens
        GenerationJob(P(engine, "Write a long story about a dragon who loves tea and lives in the mountains."), 2,
                      SamplingParams(max_tokens=6, seed=3), feature_layers=(-1, BLOCK)),
        # three rows of one prompt
        GenerationJob(P(engine, "Hi"), 3, SamplingParams(max_tokens=12, seed=5, temperature=0.8),
                      feature_layers=(-1, BLOCK)),
        # cut by a stop string, streamed
        GenerationJob(P(engine, "Describe the sea in one sentence."), 2,
                      SamplingParams(max_tokens=12, seed=7, stop=("e",)), feature_layers=(-1, BLOCK),
                      on_delta=lambda i, t, lps=None: deltas[3].setdefault(i, []).append(t)),
    ]
    results = engine.generate(jobs)
    return jobs, results, deltas


def test_results_line_up_with_jobs(mixed):
    jobs, results, _ = mixed
    assert len(results) == len(jobs)
    for job, res in zip(jobs, results):
        assert len(res.candidates) == job.n and res.prompt_tokens == len(job.prompt_ids)
        assert res.completion_tokens == sum(len(c.token_ids) for c in res.candidates)
        for c in res.candidates:
            assert c.finish_reason in {"stop", "length"}
            assert set(c.features) >= set(job.feature_layers)
            assert all(v.shape == (576,) and torch.isfinite(v).all() for v in c.features.values())


def test_feature_at_sampled_im_end_equals_standalone_forward(engine, mixed):
    jobs, results, _ = mixed
    checked = 0
    for job, res in list(zip(jobs, results))[:3]:
        for c in res.candidates:
            if c.finish_reason != "stop":
                continue
            assert engine.end_id not in c.token_ids  # the closing token is not part of the answer
            for layer in job.feature_layers:
                assert_same_feature(c.features[layer], standalone(engine, job.prompt_ids, c.token_ids, layer),
                                    f"stop candidate {c.text!r} layer {layer}")
            checked += 1
    assert checked >= 2, "expected answers that end by sampling <|im_end|> (greedy 2+2, 'Hi')"


def test_feature_of_max_tokens_cut_equals_forward_over_answer_plus_im_end(engine, mixed):
    jobs, results, _ = mixed
    checked = 0
    for job, res in list(zip(jobs, results))[:3]:
        for c in res.candidates:
            if c.finish_reason != "length":
                continue
            assert len(c.token_ids) == job.params.max_tokens
            for layer in job.feature_layers:
                assert_same_feature(c.features[layer], standalone(engine, job.prompt_ids, c.token_ids, layer),
                                    f"length candidate {c.text!r} layer {layer}")
            checked += 1
    assert [c.finish_reason for c in results[1].candidates] == ["length", "length"]
    assert checked >= 2


def test_stop_string_cut_features_equal_forward_over_the_truncated_text(engine, mixed):
    jobs, results, deltas = mixed
    job, res = jobs[3], results[3]
    for i, c in enumerate(res.candidates):
        assert c.finish_reason == "stop" and "e" not in c.text
        # The decoded tokens ran past the cut: the kept text is a strict prefix of them.
        full = engine.tokenizer.decode(c.token_ids, skip_special_tokens=True)
        assert full.startswith(c.text) and "e" in full[len(c.text):]
        answer = engine.tokenizer(c.text, add_special_tokens=False)["input_ids"]
        for layer in (-1, BLOCK):
            assert_same_feature(c.features[layer], standalone(engine, job.prompt_ids, answer, layer),
                                f"stop-string candidate {c.text!r} layer {layer}")
        # Streaming never leaks the stop string: the deltas add up to the final text exactly.
        assert "".join(deltas[3].get(i, [])) == c.text


def test_include_stop_keeps_the_stop_string_and_its_features_read_it(engine, mixed):
    """vLLM's include_stop_str_in_output: the same seeded candidates as the stop-string job above, each ending with
    the "e" that stopped it, and the feature read over that kept text (a standalone forward)."""
    jobs, results, _ = mixed
    job = jobs[3]
    kept = engine.generate([GenerationJob(job.prompt_ids, 2, replace(job.params, include_stop=True),
                                          feature_layers=(-1,))])[0]
    for c, plain in zip(kept.candidates, results[3].candidates):
        assert c.finish_reason == "stop" and c.text == plain.text + "e"
        answer = engine.tokenizer(c.text, add_special_tokens=False)["input_ids"]
        assert_same_feature(c.features[-1], standalone(engine, job.prompt_ids, answer, -1), f"kept {c.text!r}")


def test_engine_features_pass_equals_standalone_forward(engine, mixed):
    jobs, results, _ = mixed
    prompts, answers = [], []
    for job, res in zip(jobs[:3], results[:3]):
        for c in res.candidates:
            prompts.append(job.prompt_ids)
            answers.append(c.token_ids)
    feats = engine.features(prompts, answers, [BLOCK])  # right-padded batch of different lengths
    assert set(feats) == {-1, BLOCK} and feats[-1].shape == (len(answers), 576)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        for layer in (-1, BLOCK):
            assert_same_feature(feats[layer][i], standalone(engine, p, a, layer), f"features() row {i} layer {layer}")


def test_rows_of_one_prompt_differ_and_the_same_seed_repeats(engine, mixed):
    jobs, results, _ = mixed
    texts = [c.token_ids for c in results[2].candidates]
    assert len({tuple(t) for t in texts}) == 3, "three rows of one prompt sampled the same answer"
    # The same job again (same seed, same batch shape) gives the same tokens, row by row.
    again = engine.generate([GenerationJob(jobs[2].prompt_ids, 3, jobs[2].params)])[0]
    assert [c.token_ids for c in again.candidates] == texts
    assert again.candidates[0].features is None  # plain sampling computes no features
    other = engine.generate([GenerationJob(jobs[2].prompt_ids, 3, SamplingParams(max_tokens=12, seed=6, temperature=0.8))])[0]
    assert [c.token_ids for c in other.candidates] != texts


def test_a_job_samples_the_same_tokens_alone_and_beside_adversarial_jobs(engine):
    """Isolation between the requests of one batch (SECURITY.md): another request's logit_bias, penalties, top_p,
    temperature, stop strings and prompt length change nothing in this one's tokens (each row has its own seeded
    generator and its own sampler settings)."""
    p = P(engine, "Name three animals.")
    mine = SamplingParams(max_tokens=8, temperature=1.0, seed=11)
    (alone,) = engine.generate([GenerationJob(p, 2, mine)])
    banana = engine.tokenizer(" banana", add_special_tokens=False)["input_ids"][0]
    first = alone.candidates[0].token_ids[0]
    others = [
        GenerationJob(P(engine, "Write a long story about a dragon who loves tea. " * 8), 3,
                      SamplingParams(max_tokens=10, temperature=1.8, seed=11, logit_bias=((banana, 100.0), (first, -100.0)),
                                     frequency_penalty=2.0, presence_penalty=2.0, top_p=0.3)),
        GenerationJob(P(engine, "Hi"), 1, SamplingParams(max_tokens=12, temperature=0.0, logprobs=5, stop=("e",))),
    ]
    results = engine.generate([others[0], GenerationJob(p, 2, mine), others[1]])
    assert [c.token_ids for c in results[1].candidates] == [c.token_ids for c in alone.candidates]
    assert all(c.token_ids[0] == banana for c in results[0].candidates)  # the neighbour's bias did act on its rows


def test_streaming_and_cancellation_inside_a_batch(engine):
    streamed: dict[int, list[str]] = {}
    cancelled_job = GenerationJob(P(engine, "Count from one to twenty."), 2, SamplingParams(max_tokens=12, seed=1))

    def cancel_after_first(i, text, lps=None):
        cancelled_job.cancelled.set()  # as the route does when the client goes away

    cancelled_job.on_delta = cancel_after_first
    kept = GenerationJob(P(engine, "Name a fruit."), 1, SamplingParams(max_tokens=10, seed=2),
                         on_delta=lambda i, t, lps=None: streamed.setdefault(i, []).append(t))
    skipped = GenerationJob(P(engine, "Never run."), 1, SamplingParams(max_tokens=4))
    skipped.cancelled.set()
    res = engine.generate([cancelled_job, kept, skipped])
    assert res[2].candidates == []  # cancelled before it started: not run at all
    assert [c.finish_reason for c in res[0].candidates] == ["cancelled", "cancelled"]
    assert all(len(c.token_ids) <= 2 for c in res[0].candidates)  # its rows left the batch at once
    c = res[1].candidates[0]
    assert c.finish_reason in {"stop", "length"} and c.text
    assert "".join(streamed[0]) == c.text


def test_tiny_top_p_keeps_only_the_top_token_so_it_equals_greedy(engine):
    p = P(engine, "Name a colour.")
    greedy, nucleus, zero = engine.generate([
        GenerationJob(p, 1, SamplingParams(max_tokens=6, temperature=0.0)),
        GenerationJob(p, 2, SamplingParams(max_tokens=6, temperature=1.5, top_p=1e-6, seed=9)),
        GenerationJob(p, 2, SamplingParams(max_tokens=6, temperature=1.5, top_p=0.0, seed=9)),  # OpenAI allows 0
    ])
    want = greedy.candidates[0].token_ids
    assert len(want) >= 2
    assert [c.token_ids for c in nucleus.candidates] == [want, want]
    assert [c.token_ids for c in zero.candidates] == [want, want]


# --- OpenAI's sampler options: logprobs, logit_bias, frequency / presence penalties ------------------------


def test_logprobs_are_the_models_own_log_softmax_at_each_generated_token(engine):
    """Each generated token's log-prob (and its top-k) equals a standalone forward's log-softmax over the
    same prefix; top-k is sorted and contains the greedy token."""
    p = P(engine, "Name three colours.")
    (res,) = engine.generate([GenerationJob(p, 1, SamplingParams(max_tokens=6, seed=4, logprobs=3))])
    c = res.candidates[0]
    assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids) >= 2
    seq = torch.tensor([p + c.token_ids])  # [1, T]
    with torch.inference_mode():
        logits = engine.model(input_ids=seq).logits[0].float()  # [T, V]
    ref = torch.log_softmax(logits, dim=-1)
    for k, lp in enumerate(c.logprobs):
        row = ref[len(p) - 1 + k]  # the position that predicts answer token k
        assert lp.token_id == c.token_ids[k]
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), rel=1e-4, abs=1e-4)
        assert len(lp.top) == 3
        assert [t for t, _ in lp.top][0] == int(row.argmax())
        assert [v for _, v in lp.top] == sorted([v for _, v in lp.top], reverse=True)
        for t, v in lp.top:
            assert v == pytest.approx(row[t].item(), rel=1e-4, abs=1e-4)
    # Not asked for: none computed.
    (plain,) = engine.generate([GenerationJob(p, 1, SamplingParams(max_tokens=3, seed=4))])
    assert plain.candidates[0].logprobs is None


def test_logit_bias_forces_and_bans_tokens(engine):
    p = P(engine, "Say anything.")
    forced = engine.tokenizer(" banana", add_special_tokens=False)["input_ids"][0]
    (res,) = engine.generate([GenerationJob(p, 2, SamplingParams(max_tokens=4, seed=1, logit_bias=((forced, 100.0),)))])
    assert all(c.token_ids == [forced] * 4 for c in res.candidates)
    # -100 on the greedy first token: greedy decoding takes another one.
    (greedy,) = engine.generate([GenerationJob(p, 1, SamplingParams(max_tokens=1, temperature=0.0))])
    first = greedy.candidates[0].token_ids[0]
    (banned,) = engine.generate([GenerationJob(p, 1, SamplingParams(max_tokens=1, temperature=0.0,
                                                                      logit_bias=((first, -100.0),)))])
    assert banned.candidates[0].token_ids[0] != first


def test_frequency_and_presence_penalties_follow_openais_formula(engine):
    """logits[j] -= count[j] * frequency + (count[j] > 0) * presence (OpenAI's documented formula), checked
    against the adjusted distribution the sampler reports (log-probs are taken after the adjustments)."""
    p = P(engine, "Repeat the word 'cat' many times.")
    sp = SamplingParams(max_tokens=8, temperature=0.0, frequency_penalty=0.7, presence_penalty=0.4, logprobs=0)
    (res,) = engine.generate([GenerationJob(p, 1, sp)])
    c = res.candidates[0]
    seq = torch.tensor([p + c.token_ids])
    with torch.inference_mode():
        logits = engine.model(input_ids=seq).logits[0].float()  # [T, V]
    for k, lp in enumerate(c.logprobs):
        row = logits[len(p) - 1 + k].clone()
        count = torch.bincount(torch.tensor(c.token_ids[:k], dtype=torch.long), minlength=row.shape[0]).float()
        row -= count * 0.7 + (count > 0).float() * 0.4
        assert lp.token_id == int(row.argmax())  # greedy under the penalised logits
        assert lp.logprob == pytest.approx(torch.log_softmax(row, -1)[lp.token_id].item(), rel=1e-4, abs=1e-4)
    # With a strong frequency penalty the greedy answer repeats no token more than it would unpenalised.
    (free,) = engine.generate([GenerationJob(p, 1, SamplingParams(max_tokens=8, temperature=0.0))])
    (strong,) = engine.generate([GenerationJob(p, 1, SamplingParams(max_tokens=8, temperature=0.0, frequency_penalty=2.0))])
    rep = lambda ids: len(ids) - len(set(ids))  # noqa: E731
    assert rep(strong.candidates[0].token_ids) <= rep(free.candidates[0].token_ids)


def test_streamed_logprobs_cover_every_token_once(engine):
    p = P(engine, "Name a fruit.")
    got: list = []
    job = GenerationJob(p, 1, SamplingParams(max_tokens=8, seed=3, logprobs=2),
                        on_delta=lambda i, t, lps=None: got.extend(lps or []))
    (res,) = engine.generate([job])
    assert [x.token_id for x in got] == res.candidates[0].token_ids


def test_a_score_pass_nobody_waits_for_is_abandoned_within_a_block(engine):
    """The worker's ``cancelled`` poll stops the feature pass at the next block, not at the end of the pass."""
    from arbiter.backbone import decoder_layers
    from arbiter.generation.base import Abandoned

    calls = []
    hook = decoder_layers(engine.model)[3].register_forward_hook(lambda *a: calls.append(1))
    try:
        prompts = [P(engine, "Hello")] * 40
        answers = [engine.tokenizer("a fine answer", add_special_tokens=False)["input_ids"]] * 40
        with pytest.raises(Abandoned):
            engine.features(prompts, answers, [-1], cancelled=lambda: len(calls) >= 1)
        assert len(calls) == 1  # block 3 ran once (first chunk); block 4 saw the flag; chunks 2 and 3 never ran
        calls.clear()
        out = engine.features(prompts[:2], answers[:2], [-1], cancelled=lambda: False)
        # not cancelled: one batch, whose two answers share their prompt (its forward, then theirs): block 3 twice
        assert out[-1].shape[0] == 2 and len(calls) == 2
    finally:
        hook.remove()


def test_continuous_batching_admits_jobs_mid_decode_and_delivers_each_when_done(engine):
    """Jobs joining a running batch (a prompt longer than the running cache, then a shorter one) decode with
    their own positions: their captured features equal a standalone forward, greedy answers equal the same job
    run alone, and each job is delivered as soon as its rows finish, before the long first job."""
    long_job = GenerationJob(P(engine, "Write a long story about a dragon who loves tea."), 2,
                             SamplingParams(max_tokens=24, seed=1, temperature=0.0), feature_layers=(-1, BLOCK))
    later = [
        GenerationJob(P(engine, "Please list, one per line, every colour of the rainbow, and explain for each one "
                                "where it appears in nature and why people like it so much."), 1,
                      SamplingParams(max_tokens=6, temperature=0.0), feature_layers=(-1, BLOCK)),
        GenerationJob(P(engine, "Hi"), 2, SamplingParams(max_tokens=5, seed=4), feature_layers=(-1,)),
    ]
    calls, order = [], []

    def admit(rows_in_batch: int):
        calls.append(rows_in_batch)
        if len(calls) == 3:
            return later[:1]
        if len(calls) == 6:
            return later[1:]
        return []

    results = engine.generate([long_job], admit=admit, deliver=lambda job, res: order.append((job, res)))
    delivered = {id(j): r for j, r in order}
    assert [j for j, _ in order] == [later[0], later[1], long_job]  # the long job finishes last
    assert results[0] is delivered[id(long_job)]
    assert calls[:3] == [2, 2, 2] and calls[3] == 3  # the admitted row is in the batch from the next step on
    for job in (long_job, *later):
        res = delivered[id(job)]
        assert len(res.candidates) == job.n
        for c in res.candidates:
            for layer in job.feature_layers:
                assert_same_feature(c.features[layer], standalone(engine, job.prompt_ids, c.token_ids, layer),
                                    f"continuous-batching candidate {c.text!r} layer {layer}")
    alone = engine.generate([later[0]])[0].candidates[0]
    assert delivered[id(later[0])].candidates[0].token_ids == alone.token_ids


def test_continuous_batch_cache_stays_as_long_as_its_longest_live_row(engine):
    """Under steady admission the batch never ends; its KV cache must not grow without bound."""
    lengths = []
    jobs_made = []

    def admit(rows_in_batch: int):
        lengths.append(run_cache_len())
        if len(jobs_made) < 12 and rows_in_batch < 4:
            job = GenerationJob(P(engine, f"Count to {len(jobs_made) + 3}."), 1, SamplingParams(max_tokens=6, seed=len(jobs_made)))
            jobs_made.append(job)
            return [job]
        return []

    import arbiter.generation.hf as hf

    seen = {}
    real_step = hf._Batch.step

    def step(self):
        seen["batch"] = self
        return real_step(self)

    def run_cache_len() -> int:
        b = seen.get("batch")
        return 0 if b is None or b.mask is None else int(b.mask.shape[1])

    hf._Batch.step = step
    try:
        first = GenerationJob(P(engine, "Hi"), 1, SamplingParams(max_tokens=6, seed=0))
        engine.generate([first], admit=admit, deliver=lambda j, r: None)
    finally:
        hf._Batch.step = real_step
    assert len(jobs_made) == 12
    prompt_max = max(len(j.prompt_ids) for j in jobs_made)
    # 12 jobs x ~7 steps ran through one batch; without trimming the cache would be ~80+ columns long.
    assert max(lengths) <= prompt_max + 8, (max(lengths), prompt_max)
