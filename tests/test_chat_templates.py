"""Models that are not ChatML: the token that closes an assistant turn comes from the model's own chat template.

The reference for each template is the model family's published chat format (Llama 3 closes a turn with
``<|eot_id|>``, Gemma with ``<end_of_turn>``, Mistral with ``</s>``, Phi-3 with ``<|end|>``, ChatML with
``<|im_end|>``); the templates below are written after those formats, on the embedded tokenizer with the
families' special tokens added. End to end, the embedded SmolLM2 weights are saved as a model directory with a
Llama-3-style template and ``<|eot_id|>`` added as a special token (embeddings resized); that directory is
loaded, encoded, sampled from, its in-loop feature compared with a standalone forward, and a head trained on it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
PHI3 = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
PLAIN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"


@pytest.fixture(scope="module")
def base_tokenizer(backbone):
    return backbone.tokenizer


def _with(tokenizer, template: str, specials: list[str], eos: str | None = None):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": specials})
    if eos is not None:
        tok.eos_token = eos
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("template, specials, eos, want", [
    (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], None, "<|eot_id|>"),
    (GEMMA, ["<start_of_turn>", "<end_of_turn>"], None, "<end_of_turn>"),
    (MISTRAL, ["</s>", "[INST]", "[/INST]"], "</s>", "</s>"),
    (PHI3, ["<|user|>", "<|assistant|>", "<|end|>"], None, "<|end|>"),
])
def test_closing_token_is_read_from_the_template(base_tokenizer, template, specials, eos, want):
    from arbiter.backbone import end_of_turn

    tok = _with(base_tokenizer, template, specials, eos)
    text, tid = end_of_turn(tok)
    assert text == want and tid == tok.convert_tokens_to_ids(want) and tid != tok.unk_token_id


def test_chatml_model_keeps_im_end(base_tokenizer):
    from arbiter.backbone import end_of_turn

    assert end_of_turn(base_tokenizer, eos_ids=[2]) == ("<|im_end|>", 2)


def test_undeterminable_closing_token_is_a_clear_error(base_tokenizer):
    from arbiter.backbone import EndOfTurnError, end_of_turn

    with pytest.raises(EndOfTurnError, match="does not start with a special token"):
        end_of_turn(_with(base_tokenizer, PLAIN, []))
    no_template = copy.deepcopy(base_tokenizer)
    no_template.chat_template = None
    with pytest.raises(EndOfTurnError, match="no chat template"):
        end_of_turn(no_template)
    drops = _with(base_tokenizer, "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}"
                                  "{% endfor %}", [])
    with pytest.raises(EndOfTurnError, match="drops the assistant"):
        end_of_turn(drops)


@pytest.fixture(scope="module")
def llama3_dir(backbone, tmp_path_factory):
    """The embedded weights as a Llama-3-style model: new special tokens, resized embeddings, <|eot_id|> EOS."""
    from transformers import AutoModelForCausalLM

    tok = _with(backbone.tokenizer, LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                             "<|eot_id|>"])
    tok.bos_token = "<|begin_of_text|>"
    model = AutoModelForCausalLM.from_pretrained(str(backbone.path), dtype=torch.float32)
    model.resize_token_embeddings(len(tok))
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    model.generation_config.eos_token_id = [eot]
    model.config.eos_token_id = eot
    out = tmp_path_factory.mktemp("llama3-style")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama3(llama3_dir):
    from arbiter.backbone import load_backbone

    return load_backbone(str(llama3_dir), dtype="float32")


def test_llama3_style_model_loads_with_its_own_closing_token(llama3):
    assert llama3.end_token == "<|eot_id|>" and llama3.end_id == llama3.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert llama3.fingerprint.end_token == "<|eot_id|>"
    assert llama3.end_id in llama3.stop_ids


def test_llama3_style_encoding_and_answers_close_with_eot(llama3):
    from arbiter.backbone import encode_chat

    p, a = encode_chat(llama3.tokenizer, [{"role": "user", "content": "Hi there"}], "Hello!", llama3.end_id)
    tok = llama3.tokenizer
    text = tok.decode(p)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert a[-1] == llama3.end_id and tok.decode(a[:-1]) == "Hello!"
    assert tok.convert_tokens_to_ids("<|im_end|>") not in p + a


def test_llama3_style_generation_captures_the_feature_at_eot(llama3):
    from arbiter.backbone import forward_features, prompt_ids
    from arbiter.generation.base import GenerationJob, SamplingParams
    from arbiter.generation.hf import HFEngine

    eng = HFEngine(llama3)
    job = GenerationJob(prompt_ids(llama3.tokenizer, [{"role": "user", "content": "Name a colour."}]), 2,
                        SamplingParams(max_tokens=8, seed=1), feature_layers=(-1, 6))
    (res,) = eng.generate([job])
    assert len(res.candidates) == 2
    for c in res.candidates:
        assert llama3.end_id not in c.token_ids
        seq = torch.tensor([job.prompt_ids + c.token_ids + [llama3.end_id]])  # closed by <|eot_id|>
        for layer in (-1, 6):
            want = forward_features(llama3.model, seq, torch.ones_like(seq), torch.tensor([seq.shape[1] - 1]),
                                    layer=layer)[0]
            got = c.features[layer]
            cos = F.cosine_similarity(got, want, dim=0).item()
            assert cos > 0.9999 and abs((got.norm() / want.norm()).item() - 1) < 1e-3, (layer, cos)


def test_llama3_style_head_trains_and_records_the_closing_token(llama3, short_hh_pairs, tmp_path):
    from arbiter.heads import HeadRegistry
    from arbiter.training.data import save_pairs
    from arbiter.training.recipes.head import HeadRecipeConfig, run

    data = save_pairs(short_hh_pairs(8, 96, seed=0), tmp_path / "pairs.jsonl")
    cfg = HeadRecipeConfig(name="llama3_tiny", data=[str(data)], max_length=128, dev_fraction=0.0, seed=0, lr=1e-2,
                           epochs=3, batch_size=4, patience=0, cache_dir=str(tmp_path / "cache"),
                           out=str(tmp_path / "run"), progress=False, dtype="float32")
    cfg.validate()
    metrics = run(cfg, backbone=llama3)
    assert metrics["n_train"] == 8 and metrics["steps"] == 6
    reg = HeadRegistry(tmp_path, llama3.fingerprint)
    head = reg.load("run/head")
    assert head.config.backbone.end_token == "<|eot_id|>"
    # The ChatML backbone (same weights, other closing token) refuses it by name.
    from arbiter.heads import BackboneFingerprint

    chatml = BackboneFingerprint(**{**llama3.fingerprint.model_dump(), "end_token": "<|im_end|>"})
    assert any("end_token" in m for m in head.config.backbone.mismatches(chatml))
