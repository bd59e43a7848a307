"""Real third-party clients, unpatched, against a live server: the OpenAI Agents SDK's default model (the Responses
API), its_hub 1.2 (step-wise generation continuing the assistant's text; ``BestOfN`` with its ``LLMJudge`` at its
defaults, which asks for a json_schema answer; ``BestOfN`` with Arbiter's ``/v1/score`` as its outcome reward model
through ``arbiter.clients.ArbiterRewardModel``). The fast tests use the scripted fake engine, whose candidates'
features are known, so a reward is checked against ``weights . feature`` of the script; the integration tests use the
real model (the judge's answers must be JSON: constrained decoding; the reward model's pick must be the answer a
standalone forward of the model + head ranks first). lm-eval's harness is in tests/test_lm_eval.py."""

from __future__ import annotations

import asyncio

import pytest

from arbiter.testing.fakes import DEFAULT_SCRIPT, FakeEngine, FakeTokenizer, linear_head, registry_with
from arbiter.testing.served import served

its_hub = pytest.importorskip("its_hub")
agents = pytest.importorskip("agents")

WEIGHTS_B = (0.0, 1.0, 0.0, 0.0)


@pytest.fixture(scope="module")
def fake():
    engine = FakeEngine()
    with served(engine, registry_with(linear_head("A", [1, 0, 0, 0]), linear_head("B", list(WEIGHTS_B)))) as s:
        s.engine = engine
        yield s


# --- OpenAI Agents SDK ------------------------------------------------------------------------------------------


def _agent_model(srv):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
    return agents.OpenAIResponsesModel(model="fake-backbone", openai_client=client)


def test_the_agents_sdk_default_model_runs_an_agent(fake):
    """The SDK's default model class is the Responses API one; the run's final output is the engine's answer and
    the instructions reach the engine as the system turn."""
    agents.set_tracing_disabled(True)
    agent = agents.Agent(name="helper", instructions="Be brief.", model=_agent_model(fake))
    result = agents.Runner.run_sync(agent, "Name a colour.")
    assert result.final_output == "alpha"
    prompt = FakeTokenizer().decode(fake.engine.batches[-1][0].prompt_ids)
    assert "Be brief." in prompt and "Name a colour." in prompt


def test_the_agents_sdk_passes_rerank_through_extra_body(fake):
    agents.set_tracing_disabled(True)
    settings = agents.ModelSettings(extra_body={"rerank": {"candidates": 4, "heads": ["B"]}})
    agent = agents.Agent(name="helper", model=_agent_model(fake), model_settings=settings)
    result = agents.Runner.run_sync(agent, "Name a colour.")
    best = max(DEFAULT_SCRIPT, key=lambda s: sum(w * f for w, f in zip(WEIGHTS_B, s.features)))
    assert result.final_output == best.text == "charlie"


# --- its_hub ------------------------------------------------------------------------------------------------------


def _lm(srv, model: str = "fake-backbone", **kw):
    from its_hub.core.lms.openai_lm import OpenAICompatibleLanguageModel

    return OpenAICompatibleLanguageModel(endpoint=f"{srv.url}/v1", api_key="unused", model_name=model, **kw)


def test_its_hub_step_generation_continues_the_assistant_text(fake):
    """its_hub's step-wise search sends the steps so far as an assistant message with vLLM's
    ``continue_final_message``: the engine must get that text open (continued), not a new assistant turn."""
    from its_hub.core.lms.step_generation import StepGeneration

    steps = StepGeneration(max_steps=3, step_token="\n", temperature=0.7)
    step, stopped = asyncio.run(steps.aforward(_lm(fake), "Count to three.", ["One.", "Two."]))
    assert step == "alpha" and not stopped
    prompt = FakeTokenizer().decode(fake.engine.batches[-1][0].prompt_ids)
    assert prompt.endswith("One.\nTwo.") or prompt.endswith("One.\nTwo.\n"), prompt[-80:]
    assert not prompt.endswith("<|im_start|>assistant\n")


def test_arbiter_reward_model_scores_equal_the_heads_on_the_known_features(fake):
    from its_hub.api import ChatMessage

    from arbiter.clients import ArbiterRewardModel

    orm = ArbiterRewardModel(f"{fake.url}/v1", "fake-backbone", head="B")
    ask = [ChatMessage(role="user", content="Name a colour.")]
    other = [ChatMessage(role="user", content="Name another colour.")]
    convs = [[*(ask if i % 2 else other), ChatMessage(role="assistant", content=s.text)]
             for i, s in enumerate(DEFAULT_SCRIPT)]
    want = [sum(w * f for w, f in zip(WEIGHTS_B, s.features)) for s in DEFAULT_SCRIPT]
    for got in (asyncio.run(orm.ascore(convs)), orm.score(convs)):  # two prompts: two /v1/score requests
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
    assert orm.score(convs[2]) == pytest.approx(want[2], rel=1e-6, abs=1e-6)  # one conversation: one float
    with pytest.raises(ValueError, match="assistant"):
        orm.score([ask])


@pytest.fixture(scope="module")
def real(backbone, tmp_path_factory):
    """The real model on the HF engine with a seeded random head on the final norm."""
    from arbiter.generation.hf import HFEngine
    from arbiter.heads import HeadRegistry
    from arbiter.testing.fakes import save_random_head

    root = tmp_path_factory.mktemp("heads")
    save_random_head(backbone.fingerprint, root / "rand", name="rand", seed=3, scale=20.0)
    reg = HeadRegistry(str(root), backbone.fingerprint)
    reg.load("rand")
    with served(HFEngine(backbone), reg) as s:
        s.model = backbone.name
        s.head_dir = root / "rand"
        yield s


def _reference_rewards(backbone, head_dir, prompt: str, answers: list[str]) -> list[float]:
    """A standalone forward per answer: the model's final-norm state at the closing token (the chat template's
    own rendering of the conversation, ending at <|im_end|>), then the head's module."""
    import torch

    from arbiter.heads import load_head

    head, _cfg = load_head(head_dir)
    out = []
    for a in answers:
        text = backbone.tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                                       {"role": "assistant", "content": a}], tokenize=False)
        text = text[: text.rindex("<|im_end|>") + len("<|im_end|>")]
        ids = backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            h = backbone.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
            out.append(float(head(h.float()[None])[0]))
    return out


@pytest.mark.integration
def test_its_hub_best_of_n_with_arbiter_as_its_reward_model(real, backbone):
    from its_hub.core.algorithms.bon import BestOfN

    from arbiter.clients import ArbiterRewardModel

    prompt = "Give me one tip for staying focused while studying."
    bon = BestOfN(ArbiterRewardModel(f"{real.url}/v1", real.model, head="rand"))
    res = asyncio.run(bon.ainfer(_lm(real, real.model, max_tokens=24, temperature=1.0), prompt, budget=4,
                                 return_response_only=False))
    texts = [r["content"] for r in res.responses]
    assert len(set(texts)) > 1  # else BestOfN returns without scoring
    want = _reference_rewards(backbone, real.head_dir, prompt, texts)
    assert res.scores == pytest.approx(want, rel=2e-2, abs=2e-2 * max(map(abs, want)))  # bf16 or fp32 serving
    assert texts[res.selected_index] == texts[max(range(len(want)), key=want.__getitem__)]


@pytest.mark.integration
def test_its_hub_llm_judge_at_its_defaults_reads_every_score(real, caplog):
    """LLMJudge asks for a json_schema answer ({score, reasoning}, strict) by default; with constrained decoding every
    judgement parses, so no score falls back to its default (it logs a warning when one does)."""
    from its_hub.core.algorithms.bon import BestOfN
    from its_hub.core.reward_models.llm_judge import LLMJudge

    judge = LLMJudge(_lm(real, real.model, max_tokens=48, temperature=0.0))
    bon = BestOfN(judge)
    with caplog.at_level("WARNING"):
        res = asyncio.run(bon.ainfer(_lm(real, real.model, max_tokens=24, temperature=1.0),
                                     "Name a primary colour.", budget=3, return_response_only=False))
    assert len({r["content"] for r in res.responses}) > 1  # else BestOfN returns without asking the judge
    assert not [r for r in caplog.records if "score" in r.getMessage().lower()], [r.getMessage() for r in caplog.records]
    assert len(res.scores) == 3 and res.selected_index == res.scores.index(max(res.scores))
