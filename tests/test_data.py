"""arbiter.training.data: converters on real rows of shared/data, TRL files, bad-row accounting,
tokenisation / collation against the real tokenizer, and one tiny sampled-math run."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from arbiter.backbone import encode_chat
from arbiter.training.data import (
    LETTERS,
    SST2_LABELS,
    ChoiceQuestion,
    DataError,
    DataReport,
    MathProblem,
    PreferencePair,
    TokenizedPair,
    canonical_number,
    choices_to_pairs,
    collate_pairs,
    collate_texts,
    data_root,
    extract_final_answer,
    hh_to_pair,
    is_correct,
    load_choices,
    load_math,
    load_pairs,
    math_prompt,
    pair_math_samples,
    sample_math_pairs,
    save_pairs,
    split_pairs,
    tokenize_pairs,
)


def _accounted(report: DataReport) -> None:
    assert report.total == report.kept + sum(report.dropped.values()), report.summary()


def _jsonl(path, rows) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


# --------------------------------------------------------------------------------------------------
# DataReport
# --------------------------------------------------------------------------------------------------


def test_report_drop_merge_summary():
    a = DataReport("a", total=5, kept=1)
    for i in range(4):
        a.drop("identical", f"row {i}: same")
    b = DataReport("b", total=2, kept=1)
    b.drop("tie", "row 0: labels [0, 0, 1]")
    m = a.merge(b)
    assert (m.source, m.total, m.kept) == ("a+b", 7, 2)
    assert m.dropped == {"identical": 4, "tie": 1}
    assert m.examples["identical"] == ["row 0: same", "row 1: same", "row 2: same"]  # at most 3 kept
    assert a.dropped == {"identical": 4}  # inputs untouched
    assert "identical: 4" in m.summary() and "tie: 1" in m.summary()
    assert json.loads(json.dumps(m.to_dict()))["dropped"]["tie"] == 1
    m.raise_if_empty()  # kept > 0: no error
    with pytest.raises(DataError, match=r"zero usable rows out of 4 read.*identical: 4"):
        DataReport("x", total=4, dropped={"identical": 4}).raise_if_empty()


# --------------------------------------------------------------------------------------------------
# Builtin preference sources on real rows
# --------------------------------------------------------------------------------------------------


def _raw_jsonl(*parts):
    path = data_root().joinpath(*parts)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_hh_real_row_prompt_answer_split():
    rows = _raw_jsonl("hh_rlhf", "helpful-online", "test.jsonl.gz")
    prompt, chosen, rejected = hh_to_pair(rows[0]["chosen"], rows[0]["rejected"])
    assert prompt == [
        {"role": "user", "content": "If I were to give you some coordinates, could you tell me where the location is?"}
    ]
    assert chosen.startswith("Certainly!  I can tell you if the given coordinates")
    assert rejected.startswith("Yes, I can determine the location")
    # A multi-turn row: the prompt alternates user/assistant, ends with the user, and together with the
    # answer reproduces the original dialogue text (up to whitespace inside the turn markers).
    i = next(i for i, r in enumerate(rows) if r["chosen"].count("\n\nHuman:") >= 3)
    prompt, chosen, rejected = hh_to_pair(rows[i]["chosen"], rows[i]["rejected"])
    assert [m["role"] for m in prompt] == ["user", "assistant"] * (len(prompt) // 2) + ["user"]
    rebuilt = "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in prompt)
    squash = lambda s: " ".join(s.split())  # noqa: E731
    assert squash(rebuilt + "\n\nAssistant: " + chosen) == squash(rows[i]["chosen"])
    assert squash(rebuilt + "\n\nAssistant: " + rejected) == squash(rows[i]["rejected"])


def test_hh_builtin_counts():
    pairs, rep = load_pairs("hh-rlhf/helpful-online")
    _accounted(rep)
    assert rep.total == 1137
    assert rep.dropped["identical"] == 2  # the data README counts 2 pairs with chosen == rejected
    assert all(p.prompt[-1]["role"] == "user" and p.chosen and p.rejected and p.chosen != p.rejected for p in pairs)
    both, rep2 = load_pairs("hh-rlhf", limit=5)
    _accounted(rep2)
    assert rep2.total == 1137 + 2749 and rep2.kept == 5
    assert {p.meta["source"] for p in load_pairs("hh-rlhf", limit=200)[0]} == {
        "hh-rlhf/helpful-online",
        "hh-rlhf/helpful-rejection-sampled",
    }


def test_pandalm_majority_and_ties():
    with open(data_root() / "pandalm" / "testset-v1.json") as f:
        raw = json.load(f)
    expected_ties = sum(
        1
        for r in raw
        if not any([r["annotator1"], r["annotator2"], r["annotator3"]].count(v) >= 2 for v in (1, 2))
    )
    pairs, rep = load_pairs("pandalm")
    _accounted(rep)
    assert rep.total == 999
    assert rep.dropped["tie"] == expected_ties > 0
    assert len(rep.examples["tie"]) == 3
    by_row = {p.meta["row"]: p for p in pairs}
    r0 = raw[0]  # labels 2, 2, 2: response2 wins
    assert [r0["annotator1"], r0["annotator2"], r0["annotator3"]] == [2, 2, 2]
    assert by_row[0].chosen == r0["response2"].strip() and by_row[0].rejected == r0["response1"].strip()
    assert by_row[0].prompt[0]["content"] == f"{r0['instruction'].strip()}\n\n{r0['input'].strip()}"
    for row, p in by_row.items():  # every kept pair follows its majority vote
        votes = [raw[row][f"annotator{j}"] for j in (1, 2, 3)]
        winner = 1 if votes.count(1) >= 2 else 2
        # a few responses are JSON booleans (a model answered "True"): the loader renders them as text
        assert p.chosen == str(raw[row][f"response{winner}"]).strip()


def _raw_mc(source):
    """(question, choices, gold index) per row, read independently of the loader."""
    if source == "commonsense_qa":
        out = []
        for r in _raw_jsonl("commonsense_qa", "train_rand_split.jsonl.gz"):
            labels = [c["label"] for c in r["question"]["choices"]]
            out.append((r["question"]["stem"], [c["text"] for c in r["question"]["choices"]], labels.index(r["answerKey"])))
        return out
    path = ("arc_challenge", "arc_challenge.jsonl") if source == "arc_challenge" else ("openbookqa", "openbook_qa.jsonl")
    return [(r["query"], r["choices"], r["gold"]) for r in _raw_jsonl(*path)]


@pytest.mark.parametrize("source", ["commonsense_qa", "arc_challenge", "openbookqa"])
def test_multiple_choice_pairs_are_correct_vs_wrong(source):
    raw = _raw_mc(source)
    questions, rep = load_choices(source, limit=60, seed=3)
    _accounted(rep)
    assert rep.total == len(raw) and len(questions) == 60
    pairs = choices_to_pairs(questions, seed=3)
    assert len(pairs) == 60
    for q, p in zip(questions, pairs):
        stem, choices, gold = raw[p.meta["row"]]
        letters = LETTERS[: len(choices)]
        assert p.chosen == f"{letters[gold]}. {choices[gold].strip()}"
        wrong = {f"{letters[j]}. {c.strip()}" for j, c in enumerate(choices) if j != gold}
        assert p.rejected in wrong
        text = p.prompt[-1]["content"]
        assert stem.removeprefix("Question: ").strip() in text
        assert all(f"{letters[j]}. {c.strip()}" in text for j, c in enumerate(choices))  # options shown
        assert q.options[q.answer] == p.chosen
    # Deterministic per question, whatever the list order; another seed changes some draws.
    assert [p.rejected for p in choices_to_pairs(questions[::-1], seed=3)][::-1] == [p.rejected for p in pairs]
    assert [p.rejected for p in choices_to_pairs(questions, seed=4)] != [p.rejected for p in pairs]
    # load_pairs on the builtin gives the same kind of pairs.
    lp, lrep = load_pairs(source, limit=5, seed=1)
    _accounted(lrep)
    assert all(p.chosen == f"{LETTERS[raw[p.meta['row']][2]]}. {raw[p.meta['row']][1][raw[p.meta['row']][2]].strip()}" for p in lp)


def test_wrong_option_is_drawn_uniformly():
    q = ChoiceQuestion([{"role": "user", "content": "q"}], ["A. w", "B. x", "C. y", "D. z"], 1, {"source": "t", "row": 0})
    counts = {}
    for seed in range(400):
        r = choices_to_pairs([q], seed=seed)[0].rejected
        counts[r] = counts.get(r, 0) + 1
    assert set(counts) == {"A. w", "C. y", "D. z"}  # never the correct one
    assert all(90 <= n <= 180 for n in counts.values()), counts  # ~133 each


def test_sst2_pairs():
    lines = (data_root() / "sst2" / "dev.tsv").read_text().splitlines()
    pairs, rep = load_pairs("sst2/dev", limit=40, seed=0)
    _accounted(rep)
    assert rep.total == 6735
    for p in pairs:
        sentence, label = lines[p.meta["row"]].split("\t")
        assert p.chosen == SST2_LABELS[int(label)] and p.rejected == SST2_LABELS[1 - int(label)]
        assert p.prompt[-1]["content"].endswith(f"Sentence: {sentence.strip()}")
        assert "sentiment" in p.prompt[-1]["content"]
    assert {p.chosen for p in pairs} == {"negative", "positive"}


def test_unknown_source_is_a_clear_error():
    with pytest.raises(DataError, match="neither an existing file nor a builtin"):
        load_pairs("no-such-dataset")
    with pytest.raises(DataError, match="unknown hh-rlhf split"):
        load_pairs("hh-rlhf/helpful-base")


# --------------------------------------------------------------------------------------------------
# Math
# --------------------------------------------------------------------------------------------------


def test_gsm8k_answers_from_real_rows():
    raw = _raw_jsonl("gsm8k", "train.jsonl.gz")
    problems, rep = load_math("gsm8k")
    _accounted(rep)
    assert rep.total == len(raw) == 7473 and rep.kept == 7473
    for p in problems:
        gold_line = raw[p.meta["row"]]["answer"].strip().splitlines()[-1]
        assert gold_line.startswith("####")
        assert p.answer == canonical_number(gold_line[4:])
        assert extract_final_answer(p.meta["solution"]) == p.answer  # the worked solution checks out
        assert is_correct(p.meta["solution"], p)
    assert raw[0]["answer"].endswith("#### 72") and extract_final_answer(raw[0]["answer"]) == "72"
    assert math_prompt(problems[0])[-1]["role"] == "user" and problems[0].question in math_prompt(problems[0])[0]["content"]
    short, srep = load_math("gsm8k", limit=4, seed=0)
    assert short == problems[:4] and srep.dropped["beyond_limit"] == 7473 - 4


def test_svamp_answers_from_real_rows():
    with open(data_root() / "svamp" / "SVAMP.json") as f:
        raw = json.load(f)
    problems, rep = load_math("svamp")
    _accounted(rep)
    assert rep.total == 1000
    for p in problems:
        r = raw[p.meta["row"]]
        assert p.question == f"{r['Body'].strip()} {r['Question'].strip()}"
        assert float(p.answer) == pytest.approx(float(r["Answer"]))
        assert "." not in p.answer or not p.answer.endswith("0")  # canonical: "51", never "51.0"
        assert is_correct(f"So the result is {r['Answer']}.", p)
    first = next(p for p in problems if p.meta["row"] == 0)  # chal-1: 76 - 25 = 51.0
    assert first.answer == "51" and is_correct("The answer is 51.", first) and not is_correct("The answer is 52", first)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("The answer is 42.", "42"),
        ("the answer is: $1,234.50 in total", "1234.5"),
        ("So she pays $1,234.50.", "1234.5"),
        ("42.0", "42"),
        ("It costs 3.10 dollars", "3.1"),
        ("We get -7 degrees", "-7"),
        ("5-3 = 2", "2"),
        ("I think the final \\boxed{18} is right, not 20", "18"),
        ("3 apples, then 5 apples, so 8 apples", "8"),
        ("The answer is 12 (3 boxes of 4)", "12"),
        ("she got 4 incorrect answers and 36 right", "36"),  # "answers" is not an answer marker
        ("Final answer: 0.50", "0.5"),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_final_answer_edge_cases(text, expected):
    assert extract_final_answer(text) == expected


def test_canonical_number():
    assert canonical_number("42.0") == canonical_number("42") == canonical_number(42.0) == "42"
    assert canonical_number("$1,234.50") == "1234.5"
    assert canonical_number("-0.0") == "0"
    assert canonical_number("abc") is None and canonical_number(None) is None and canonical_number("nan") is None
    p = MathProblem("q", "42", {})
    assert is_correct("#### 42.00", p) and not is_correct("#### 41", p) and not is_correct("no idea", p)


# --------------------------------------------------------------------------------------------------
# TRL-format files
# --------------------------------------------------------------------------------------------------

MSG = lambda role, content: {"role": role, "content": content}  # noqa: E731


def test_jsonl_text_form(tmp_path):
    path = _jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "ref_chosen_logp": -1.5},
            {"prompt": "Say hi", "chosen": " Hi! ", "rejected": "No.", "ref_chosen_logp": -2.0},
        ],
    )
    pairs, rep = load_pairs(path, seed=0)
    _accounted(rep)
    assert rep.kept == 2 and rep.dropped == {}
    by = {p.prompt[0]["content"]: p for p in pairs}
    assert by["What is 2+2?"].prompt == [MSG("user", "What is 2+2?")]
    assert (by["What is 2+2?"].chosen, by["What is 2+2?"].rejected) == ("4", "5")
    assert by["Say hi"].chosen == "Hi!"  # answers are stripped
    assert by["What is 2+2?"].meta["ref_chosen_logp"] == -1.5  # extra columns travel in meta
    assert by["What is 2+2?"].meta["source"] == path and by["What is 2+2?"].meta["row"] == 0


def test_json_array_conversational_explicit_prompt(tmp_path):
    rows = [
        {
            "prompt": [MSG("system", "Be brief."), MSG("user", "Capital of France?")],
            "chosen": [MSG("assistant", "Paris.")],
            "rejected": [MSG("assistant", "Lyon.")],
        },
        {"prompt": [MSG("user", "Hi")], "chosen": [MSG("assistant", "Hello")], "rejected": [MSG("assistant", "Go away")]},
    ]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(rows))
    pairs, rep = load_pairs(str(path))
    assert rep.kept == 2
    p = next(p for p in pairs if p.meta["row"] == 0)
    assert p.prompt == rows[0]["prompt"] and (p.chosen, p.rejected) == ("Paris.", "Lyon.")


def test_parquet_implicit_prompt_and_roundtrip(tmp_path):
    datasets = pytest.importorskip("datasets")
    convo = [MSG("user", "Hi"), MSG("assistant", "Hello, how can I help?"), MSG("user", "Tell me a joke")]
    rows = {
        "chosen": [convo + [MSG("assistant", "Why did the chicken cross the road?")], [MSG("user", "2+2?"), MSG("assistant", "4")]],
        "rejected": [convo + [MSG("assistant", "No.")], [MSG("user", "2+2?"), MSG("assistant", "22")]],
    }
    path = tmp_path / "p.parquet"
    datasets.Dataset.from_dict(rows).to_parquet(str(path))
    pairs, rep = load_pairs(str(path))
    assert rep.kept == 2 and rep.dropped == {}
    p = next(p for p in pairs if p.meta["row"] == 0)
    assert p.prompt == convo and p.chosen == "Why did the chicken cross the road?" and p.rejected == "No."
    # save_pairs writes TRL conversational JSONL that loads back into the same pairs.
    out = save_pairs(pairs, tmp_path / "saved.jsonl")
    back, _ = load_pairs(str(out))
    key = lambda q: json.dumps(q.prompt)  # noqa: E731
    assert sorted(((key(q), q.chosen, q.rejected) for q in back)) == sorted(((key(q), q.chosen, q.rejected) for q in pairs))


def test_jsonl_implicit_hh_text(tmp_path):
    path = _jsonl(
        tmp_path / "hh.jsonl",
        [{"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: A pun.", "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: joke?\n\nAssistant: No."}],
    )
    (p,), rep = load_pairs(path)
    assert p.prompt == [MSG("user", "hi"), MSG("assistant", "hello"), MSG("user", "joke?")]
    assert (p.chosen, p.rejected) == ("A pun.", "No.")


def test_bad_rows_are_counted_not_fatal(tmp_path):
    path = _jsonl(
        tmp_path / "bad.jsonl",
        [
            {"prompt": "ok", "chosen": "yes", "rejected": "no"},
            {"prompt": "no chosen", "rejected": "no"},  # missing_field
            {"prompt": "empty", "chosen": "   ", "rejected": "no"},  # empty_answer
            {"prompt": "same", "chosen": "x", "rejected": "x"},  # identical
            "{this is not json",  # unparseable (forces the line-by-line fallback reader)
            {"prompt": [MSG("user", "a"), MSG("assistant", "b")], "chosen": "c", "rejected": "d"},  # ends with assistant
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: DIFFERENT\n\nAssistant: c"},  # prefixes differ
            {"prompt": "ok2", "chosen": "fine", "rejected": "bad"},
        ],
    )
    pairs, rep = load_pairs(path)
    _accounted(rep)
    assert rep.total == 8 and rep.kept == 2
    assert rep.dropped == {"missing_field": 1, "empty_answer": 1, "identical": 1, "unparseable": 3}
    assert any("row 4" in e for e in rep.examples["unparseable"])
    assert "unparseable: 3" in rep.summary()


def test_zero_usable_rows_raise_with_counts(tmp_path):
    path = _jsonl(tmp_path / "none.jsonl", [{"prompt": "a", "chosen": "x", "rejected": "x"}, {"prompt": "b", "chosen": "y"}])
    with pytest.raises(DataError, match=r"zero usable rows out of 2 read.*identical: 1.*missing_field: 1"):
        load_pairs(path)


def test_limit_is_prefix_of_seeded_shuffle(tmp_path):
    path = _jsonl(tmp_path / "many.jsonl", [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(30)])
    full, _ = load_pairs(path, seed=7)
    part, rep = load_pairs(path, seed=7, limit=10)
    assert part == full[:10]
    assert rep.kept == 10 and rep.dropped == {"beyond_limit": 20}
    _accounted(rep)
    assert [p.meta["row"] for p in load_pairs(path, seed=8)[0]] != [p.meta["row"] for p in full]


def test_split_pairs_deterministic_and_grouped():
    pairs = [PreferencePair([MSG("user", f"q{i // 3}")], f"c{i}", f"r{i}", {"row": i}) for i in range(60)]  # 20 prompts x 3
    train, dev = split_pairs(pairs, dev_fraction=0.2, seed=1)
    assert (train, dev) == split_pairs(pairs, dev_fraction=0.2, seed=1)
    assert len(train) + len(dev) == 60 and len(dev) == 12
    assert {p.meta["row"] for p in train}.isdisjoint({p.meta["row"] for p in dev})
    assert {p.prompt[0]["content"] for p in train}.isdisjoint({p.prompt[0]["content"] for p in dev})  # no prompt leaks
    assert [p.meta["row"] for p in dev] == sorted(p.meta["row"] for p in dev)  # input order kept
    assert split_pairs(pairs, dev_fraction=0.2, seed=2)[1] != dev
    assert split_pairs(pairs, dev_fraction=0.0, seed=1) == (pairs, [])
    with pytest.raises(ValueError):
        split_pairs(pairs, dev_fraction=1.0, seed=0)


# --------------------------------------------------------------------------------------------------
# Tokenising and collating (real tokenizer)
# --------------------------------------------------------------------------------------------------


def test_tokenize_pairs_matches_encode_chat(backbone):
    tok, end = backbone.tokenizer, backbone.end_id
    pairs = [
        PreferencePair([MSG("user", "What is 2+2?")], "4", "It is 5.", {"source": "t", "row": 0}),
        PreferencePair([MSG("user", "Hi"), MSG("assistant", "Hello"), MSG("user", "Bye")], "Goodbye!", "No.", {"row": 1}),
        PreferencePair([MSG("user", "same")], "x", "x", {"row": 2}),  # identical
        PreferencePair([MSG("user", "empty")], "", "y", {"row": 3}),  # empty_answer
        PreferencePair([MSG("user", "long " * 300)], "a", "b", {"row": 4}),  # over_length
    ]
    out, rep = tokenize_pairs(pairs, tok, end, max_length=128)
    _accounted(rep)
    assert rep.dropped == {"identical": 1, "empty_answer": 1, "over_length": 1} and len(out) == 2
    for tp, p in zip(out, pairs[:2]):
        pc, ac = encode_chat(tok, p.prompt, p.chosen, end)
        pr, ar = encode_chat(tok, p.prompt, p.rejected, end)
        assert pc == pr == tp.prompt_ids and ac == tp.chosen_ids and ar == tp.rejected_ids
        assert tp.chosen_ids[-1] == end and tp.rejected_ids[-1] == end
        assert end not in tp.chosen_ids[:-1]
        assert tp.meta == p.meta
    # truncate_prompt keeps the over-long pair, left-truncated to fit exactly
    kept, rep2 = tokenize_pairs(pairs[4:], tok, end, max_length=128, truncate_prompt=True)
    full_prompt, ans = encode_chat(tok, pairs[4].prompt, "a", end)
    assert rep2.kept == 1 and kept[0].prompt_ids == full_prompt[-(128 - len(ans)):]
    assert len(kept[0].prompt_ids) + len(kept[0].chosen_ids) == 128
    with pytest.raises(DataError, match="zero usable rows"):
        tokenize_pairs(pairs[2:4], tok, end, max_length=128)
    assert tokenize_pairs([], tok, end, max_length=128)[0] == []


def test_collate_pairs_by_hand():
    pad, end = 0, 2
    batch = [
        TokenizedPair([5, 6, 7], [8, end], [9, 10, 11, end], {}),
        TokenizedPair([5], [12, 13, end], [end], {}),
    ]
    b = collate_pairs(batch, pad)
    assert b["input_ids"].tolist() == [
        [5, 6, 7, 8, end, pad, pad],  # chosen 0
        [5, 12, 13, end, pad, pad, pad],  # chosen 1
        [5, 6, 7, 9, 10, 11, end],  # rejected 0
        [5, end, pad, pad, pad, pad, pad],  # rejected 1
    ]
    assert b["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0, 0, 0],
    ]
    assert b["answer_mask"].tolist() == [
        [0, 0, 0, 1, 1, 0, 0],
        [0, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 1],
        [0, 1, 0, 0, 0, 0, 0],
    ]
    assert b["end_positions"].tolist() == [4, 3, 6, 1]
    assert b["answer_lengths"].tolist() == [2, 3, 4, 1]
    assert all(b["input_ids"][i, e].item() == end for i, e in enumerate(b["end_positions"].tolist()))
    assert all(v.dtype == torch.long for v in b.values())
    t = collate_texts([([1, 2], [3, end])], pad)
    assert t["input_ids"].shape == (1, 4) and t["end_positions"].tolist() == [3]


def test_collate_real_tokens(backbone):
    pairs = [
        PreferencePair([MSG("user", "Capital of France?")], "Paris.", "I am not sure, maybe Lyon?", {}),
        PreferencePair([MSG("user", "2+2?")], "4", "5", {}),
    ]
    out, _ = tokenize_pairs(pairs, backbone.tokenizer, backbone.end_id, max_length=256)
    b = collate_pairs(out, backbone.end_id)
    assert b["input_ids"].shape == b["attention_mask"].shape == b["answer_mask"].shape == (4, b["input_ids"].shape[1])
    rows = [(t.prompt_ids, t.chosen_ids) for t in out] + [(t.prompt_ids, t.rejected_ids) for t in out]
    for i, (p, a) in enumerate(rows):
        assert b["input_ids"][i, : len(p) + len(a)].tolist() == p + a
        assert b["input_ids"][i, b["answer_mask"][i].bool()].tolist() == a
        assert b["end_positions"][i].item() == len(p) + len(a) - 1 and b["answer_lengths"][i].item() == len(a)
        assert b["attention_mask"][i].sum().item() == len(p) + len(a)


# --------------------------------------------------------------------------------------------------
# Sampled math pairs (tiny real run)
# --------------------------------------------------------------------------------------------------


def test_sample_math_pairs_accounting(backbone):
    problems, _ = load_math("svamp", limit=2, seed=0)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    pairs, rep = sample_math_pairs(backbone, problems, k=2, max_new_tokens=16, temperature=1.0, seed=0, batch_size=2)
    assert torch.equal(torch.rand(3), before)  # the global RNG is left untouched
    _accounted(rep)
    assert rep.total == 2 and rep.kept == len(pairs)
    assert set(rep.dropped) <= {"no_correct", "no_incorrect"}
    assert rep.stats["samples"] == 4
    assert 0 <= rep.stats["correct"] <= 4 and 0 <= rep.stats["unfinished"] <= 4
    for p in pairs:
        problem = next(q for q in problems if q.meta["row"] == p.meta["row"])
        assert p.prompt == math_prompt(problem)
        assert is_correct(p.chosen, problem) and (not is_correct(p.rejected, problem) or not p.meta["rejected_finished"])
    with pytest.raises(ValueError, match="k must be >= 2"):
        sample_math_pairs(backbone, problems, k=1, max_new_tokens=4, temperature=1.0, seed=0)


def test_pair_math_samples_pairing_rules():
    problems = [MathProblem(f"q{i}", a, {"source": "t", "row": i}) for i, a in enumerate(["5", "2", "9", "4"])]
    samples = [  # (text, finished)
        [("So the answer is 5.", True), ("The answer is 7.", True), ("The answer is 5", True)],  # pair
        [("The answer is 2", True), ("It is 2.", True), ("#### 2", True)],  # no_incorrect
        [("The answer is 9 and", False), ("I do not know.", True), ("The answer is 8", True)],  # unfinished 9 is wrong
        [("", True), ("The answer is 4", True), ("The answer is 3", False)],  # empty never used; unfinished can be rejected
    ]
    pairs, rep = pair_math_samples(problems, samples, seed=0, sampler={"k": 3})
    _accounted(rep)
    assert rep.total == 4 and rep.kept == 2 and rep.dropped == {"no_incorrect": 1, "no_correct": 1}
    assert rep.stats == {"samples": 12, "correct": 6, "unfinished": 2, "empty": 1}
    by_row = {p.meta["row"]: p for p in pairs}
    assert by_row[0].chosen in {"So the answer is 5.", "The answer is 5"} and by_row[0].rejected == "The answer is 7."
    assert (by_row[3].chosen, by_row[3].rejected, by_row[3].meta["rejected_finished"]) == ("The answer is 4", "The answer is 3", False)
    assert by_row[0].prompt == math_prompt(problems[0]) and by_row[0].meta["sampler"] == {"k": 3}
    with pytest.raises(ValueError, match="sample groups"):
        pair_math_samples(problems, samples[:2], seed=0)


def test_user_jsonl_for_choice_and_math(tmp_path):
    """``arbiter eval choice`` / ``bestofn`` read a user's JSONL: {"question", "choices", "answer"} with the
    answer as an index, the option text or its letter; {"question", "answer"} for math. Bad rows are counted."""
    from arbiter.training.data import load_choices, load_math

    mc = tmp_path / "mine.jsonl"
    mc.write_text("\n".join(json.dumps(r) for r in [
        {"question": "2+2?", "choices": ["3", "4"], "answer": 1},
        {"question": "Capital of France?", "choices": ["Rome", "Paris", "Oslo"], "answer": "Paris"},
        {"question": "Sky colour?", "choices": ["green", "blue"], "answer": "b"},
        {"question": "No answer", "choices": ["x", "y"]},
        {"question": "Bad letter", "choices": ["x", "y"], "answer": "Q"},
    ]) + "\n")
    qs, report = load_choices(str(mc), seed=0)
    got = sorted((q.prompt[0]["content"].split("\n")[0], q.options[q.answer]) for q in qs)
    assert got == [("2+2?", "B. 4"), ("Capital of France?", "B. Paris"), ("Sky colour?", "B. blue")]
    assert report.kept == 3 and report.dropped == {"missing_field": 1, "unparseable": 1}
    math_file = tmp_path / "math.jsonl"
    math_file.write_text('{"question": "1+1?", "answer": 2}\n{"question": "half of 3?", "answer": "1.5"}\n'
                         '{"question": "x", "answer": "many"}\n')
    probs, report = load_math(str(math_file), seed=0)
    assert sorted(p.answer for p in probs) == ["1.5", "2"] and report.dropped == {"unparseable": 1}


def test_autoj_pairs_follow_the_label_and_drop_ties():
    """shared autoj README: 1391 rows = 519 (response 1 preferred) + 499 (response 2) + 373 ties."""
    import gzip
    import json as _json

    from arbiter.training.data import load_pairs
    from arbiter.training.data.io import _data_file

    pairs, rep = load_pairs("autoj", seed=0)
    assert rep.total == 1391 and rep.dropped["tie"] == 373
    assert len(pairs) + sum(v for k, v in rep.dropped.items() if k != "tie") == 519 + 499
    rows = [_json.loads(x) for x in gzip.open(_data_file("autoj", "autoj_pairwise.jsonl.gz"), "rt")]
    first = next(r for r in rows if r["label"] == 1 and r["response 1"].strip() and r["response 2"].strip())
    match = next(p for p in pairs if p.prompt[0]["content"] == first["prompt"].strip())
    assert match.chosen == first["response 2"].strip() and match.rejected == first["response 1"].strip()
