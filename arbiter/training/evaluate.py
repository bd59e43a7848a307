"""``arbiter eval``: how good is a reward head? Three tasks, each writing ``<out>/<task>_<data>.json`` + ``.md``.

- :func:`eval_pairs`: reward accuracy on preference pairs: share of pairs with r(chosen) > r(rejected)
  (strict, ties count as wrong, as TRL's ``rewards/accuracies``), mean margin r_w - r_l. Features come from
  the same cached feature path as training (``feature_cache.pair_features``).
- :func:`eval_choice`: multiple-choice accuracy. Every option is scored as an answer to the question; the
  head picks the option with the highest reward, the baseline the option with the highest average answer
  log-prob under the LM (the DPH paper's comparison). One decoder pass gives both
  (``logprobs.forward_logps``: log-probs and the final-norm hidden state at the closing ``<|im_end|>``).
- :func:`eval_bestofn`: best-of-N on verifiable math (gsm8k / svamp). N samples per question from the
  backbone itself (``model.generate``), each scored by the head at its closing ``<|im_end|>`` (the token ids
  as generated, closed by ``<|im_end|>`` as the service does). Reports pass@1 (the first sample), the mean
  sample accuracy, the head's pick (argmax reward), a reward-weighted vote over extracted final answers
  (weights softmax(r) over a question's samples: invariant to the reward offset a contrastive head leaves
  free), a majority vote and the oracle pass@N (any sample correct). A sample counts as correct only if it
  finished (emitted ``<|im_end|>``) and its extracted answer equals the reference.

Numbers that are shares are in [0, 1]; ``*_se`` is the binomial standard error sqrt(p (1 - p) / n).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .artifacts import atomic_write_json, atomic_write_text
from .stats import accuracy_se

if TYPE_CHECKING:
    import torch

log = logging.getLogger("arbiter.training.evaluate")




def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(s).name if Path(s).suffix else s).strip("-") or "data"


def _setup(head: str, model: str | None, backbone: Any, dtype: str = "auto"):
    """(backbone, head module, head config); the head is checked against the backbone's fingerprint.

    The backbone loads in ``dtype`` (default ``auto``, as the server picks it: bfloat16 only where this CPU
    multiplies it natively and measurably faster, float32 otherwise), not in the head's ``feature_dtype``:
    on a CPU without native bf16 a bfloat16 backbone is emulated and several times slower. When the two
    differ the same warning as the server's is logged, and the report records both dtypes."""
    from arbiter.heads import load_head

    if backbone is None:
        from arbiter.backbone import load_backbone

        backbone = load_backbone(model, dtype=dtype)
    module, config = load_head(head, expected_backbone=backbone.fingerprint)
    warning = config.dtype_warning(backbone.dtype)
    if warning:
        log.warning("%s", warning)
    return backbone, module, config


def _write(report: dict, out: str | None, head_name: str, task: str, data: str,
           rewards: tuple[Sequence[float], Sequence[float], tuple[str, str]] | None = None) -> dict:
    """Write ``<stem>.json`` and ``<stem>.md``; with ``rewards`` = (chosen-like, rejected-like, their labels) also
    the reward / margin histograms and the reliability diagram of sigmoid(margin) as PNGs the markdown links."""
    from . import plots

    out_dir = Path(out) if out else Path("runs") / "eval" / head_name
    stem = f"{task}_{_slug(data)}"
    jpath, mpath = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    report["paths"] = {"json": str(jpath), "markdown": str(mpath)}
    if rewards is not None:
        good, bad, labels = rewards
        title = f"{head_name} on {data}"
        figs = {"rewards": plots.safely(plots.reward_histograms, good, bad, out_dir / f"{stem}_rewards.png", title, labels)}
        rel = plots.safely(plots.reliability_diagram, [g - b for g, b in zip(good, bad)],
                           out_dir / f"{stem}_reliability.png", title)
        if rel is not None:
            figs["reliability"], report["ece"] = rel
        report["plots"] = {k: Path(v).name for k, v in figs.items() if v is not None}
    atomic_write_json(jpath, report)
    atomic_write_text(mpath, markdown(report))
    return report


def _base(task: str, head: str, config: Any, data: str, backbone: Any) -> dict:
    return {
        "task": task,
        "head": str(head),
        "head_name": config.name,
        "head_pooler": config.pooler,
        "head_layer": config.layer,
        "data": data,
        "backbone": backbone.name,
        "backbone_dtype": backbone.dtype,
        "head_feature_dtype": config.feature_dtype,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _rewards(module: Any, features: "torch.Tensor", batch: int = 4096) -> "torch.Tensor":
    """Head rewards of feature rows, [N, d] -> [N] float32 (``arbiter.heads.head_rewards``, as the service scores)."""
    from arbiter.heads import head_rewards

    return head_rewards(module, features, batch=batch)


# --------------------------------------------------------------------------------------------------
# pairs
# --------------------------------------------------------------------------------------------------


def eval_pairs(
    *,
    head: str,
    data: str,
    limit: int | None = None,
    seed: int = 0,
    out: str | None = None,
    model: str | None = None,
    dtype: str = "auto",
    batch_tokens: int = 4096,
    max_length: int = 1024,
    truncate_prompt: bool = False,
    cache_dir: str | None = None,
    backbone: Any = None,
    progress: bool = True,
) -> dict:
    """Reward accuracy and mean margin of a head on preference pairs (file or builtin source)."""
    from .data import load_pairs, tokenize_pairs
    from .feature_cache import pair_features

    t0 = time.perf_counter()
    backbone, module, config = _setup(head, model, backbone, dtype)
    pairs, report = load_pairs(data, limit=limit, seed=seed)
    tok, trep = tokenize_pairs(pairs, backbone.tokenizer, backbone.end_id, max_length=max_length,
                               truncate_prompt=truncate_prompt)
    feats = pair_features(backbone, tok, layer=config.layer, max_length=max_length, cache_dir=cache_dir,
                          batch_tokens=batch_tokens, progress=progress)
    r_w, r_l = _rewards(module, feats.chosen), _rewards(module, feats.rejected)  # [N], [N]
    margin = r_w - r_l  # [N]
    n = len(tok)
    acc = float((margin > 0).float().mean())
    res = _base("pairs", head, config, data, backbone)
    res.update(
        n=n,
        accuracy=acc,
        accuracy_se=accuracy_se(acc, n),
        ties=int((margin == 0).sum()),
        mean_margin=float(margin.mean()),
        mean_reward_chosen=float(r_w.mean()),
        mean_reward_rejected=float(r_l.mean()),
        report={"source": report.source, "read": report.total, "loaded": report.kept, "dropped": dict(report.dropped),
                "tokenize_dropped": dict(trep.dropped), "evaluated": n, "max_length": max_length},
        features={"status": feats.status, "seconds": round(feats.seconds, 2), "tokens": feats.tokens},
        seconds=round(time.perf_counter() - t0, 2),
    )
    return _write(res, out, config.name, "pairs", data, rewards=(r_w.tolist(), r_l.tolist(), ("chosen", "rejected")))


# --------------------------------------------------------------------------------------------------
# multiple choice
# --------------------------------------------------------------------------------------------------


def _batches_by_length(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    from arbiter.backbone import length_batches

    return length_batches(lengths, batch_tokens, 64)


def score_answers(
    backbone: Any,
    module: Any,
    layer: int,
    rows: Sequence[tuple[list[int], list[int]]],
    *,
    batch_tokens: int = 4096,
    progress: bool = True,
    desc: str = "scoring answers",
) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """(head rewards [N], summed answer log-probs [N], answer lengths [N]) of (prompt ids, answer ids) rows.

    One decoder pass per batch (``logprobs.forward_logps``) gives the log-probs and the head features:
    the final-norm hidden state at the closing ``<|im_end|>`` (layer -1) or block ``layer``'s raw output there.
    """
    import torch
    from tqdm.auto import tqdm

    from arbiter.heads import end_features

    from .data import collate_texts
    from .logprobs import forward_logps

    pad = backbone.tokenizer.pad_token_id
    pad = backbone.end_id if pad is None else pad
    n = len(rows)
    rewards = torch.zeros(n)
    logps = torch.zeros(n)
    lengths = torch.zeros(n, dtype=torch.long)
    seq_len = [len(p) + len(a) for p, a in rows]
    bar = tqdm(total=sum(seq_len), desc=desc, unit="tok", unit_scale=True, disable=not progress)
    with torch.inference_mode():
        for idx in _batches_by_length(seq_len, batch_tokens):
            batch = collate_texts([rows[i] for i in idx], pad)
            out = forward_logps(backbone.model, batch, end_features=layer < 0,
                                capture_layers=[layer] if layer >= 0 else ())
            if out.end_hidden is not None:  # layer < 0
                feats = out.end_hidden  # [b, d]
            else:
                feats = end_features(out.captured[layer], batch["end_positions"].to(out.captured[layer].device))
            ix = torch.tensor(idx)
            rewards[ix] = _rewards(module, feats).cpu()
            logps[ix] = out.logps.float().cpu()
            lengths[ix] = out.lengths.cpu()
            bar.update(sum(seq_len[i] for i in idx))
    bar.close()
    return rewards, logps, lengths


def eval_choice(
    *,
    head: str,
    data: str,
    limit: int | None = None,
    seed: int = 0,
    out: str | None = None,
    model: str | None = None,
    dtype: str = "auto",
    batch_tokens: int = 4096,
    backbone: Any = None,
    progress: bool = True,
) -> dict:
    """Multiple-choice accuracy: option picked by head reward vs by average (and summed) answer log-prob."""
    import torch

    from arbiter.backbone import answer_ids, prompt_ids

    from .data import load_choices

    t0 = time.perf_counter()
    backbone, module, config = _setup(head, model, backbone, dtype)
    questions, report = load_choices(data, limit=limit, seed=seed)
    rows, owner = [], []
    for qi, q in enumerate(questions):
        pids = prompt_ids(backbone.tokenizer, q.prompt)
        for opt in q.options:
            rows.append((pids, answer_ids(backbone.tokenizer, opt, backbone.end_id)))
            owner.append(qi)
    rewards, logps, lengths = score_answers(backbone, module, config.layer, rows, batch_tokens=batch_tokens,
                                            progress=progress, desc=f"scoring {len(rows)} options")
    avg = logps / lengths.clamp(min=1).float()  # [N] average answer log-prob
    per_q = defaultdict(list)
    for i, qi in enumerate(owner):
        per_q[qi].append(i)
    head_ok = avg_ok = sum_ok = agree = 0
    examples: list[dict[str, Any]] = []
    correct_r: list[float] = []
    best_wrong_r: list[float] = []  # per question: the correct option's reward, the best wrong option's
    for qi, q in enumerate(questions):
        ix = torch.tensor(per_q[qi])
        correct_r.append(float(rewards[ix][q.answer]))
        best_wrong_r.append(max(float(rewards[ix][j]) for j in range(len(ix)) if j != q.answer))
        h, a, s = int(rewards[ix].argmax()), int(avg[ix].argmax()), int(logps[ix].argmax())
        head_ok += h == q.answer
        avg_ok += a == q.answer
        sum_ok += s == q.answer
        agree += h == a
        if len(examples) < 5:
            examples.append({"meta": {k: v for k, v in q.meta.items() if k in ("source", "row", "id")},
                             "answer": q.answer, "head_pick": h, "logprob_pick": a,
                             "rewards": [round(float(x), 4) for x in rewards[ix]],
                             "avg_logps": [round(float(x), 4) for x in avg[ix]]})
    n = len(questions)
    res = _base("choice", head, config, data, backbone)
    res.update(
        n=n,
        head_accuracy=head_ok / n,
        head_accuracy_se=accuracy_se(head_ok / n, n),
        logprob_accuracy=avg_ok / n,
        logprob_accuracy_se=accuracy_se(avg_ok / n, n),
        logprob_sum_accuracy=sum_ok / n,
        agreement=agree / n,
        chance=sum(1 / len(q.options) for q in questions) / n,
        report={"source": report.source, "read": report.total, "evaluated": n, "dropped": dict(report.dropped)},
        examples=examples,
        seconds=round(time.perf_counter() - t0, 2),
    )
    return _write(res, out, config.name, "choice", data,
                  rewards=(correct_r, best_wrong_r, ("correct option", "best wrong option")))


# --------------------------------------------------------------------------------------------------
# best-of-N on math
# --------------------------------------------------------------------------------------------------


def eval_bestofn(
    *,
    head: str,
    data: str,
    n: int = 8,
    limit: int | None = None,
    seed: int = 0,
    out: str | None = None,
    model: str | None = None,
    dtype: str = "auto",
    batch_tokens: int = 4096,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 1.0,
    gen_batch: int = 4,
    backbone: Any = None,
    progress: bool = True,
) -> dict:
    """Sample ``n`` answers per math problem, score them with the head, compare selection rules.

    Exactly what the server does for a rerank request (docs/architecture.md "One sampler"): problem j is sampled
    by the HF engine as a request with ``seed + j`` (``arbiter.training.sampling``), every candidate is scored by
    the head on the engine's own features, and ``head_pick`` / ``weighted_vote`` / ``majority_vote`` are the
    candidate the server returns under ``rerank.select`` = argmax / weighted_vote / majority_vote with the
    ``last_number`` extractor (``arbiter.selection.select``). A picked candidate is right when it finished
    and its final number equals the gold answer."""
    import torch

    from arbiter.answers import extractor
    from arbiter.chat import prompt_ids
    from arbiter.generation.base import SamplingParams
    from arbiter.heads import head_rewards
    from arbiter.selection import select

    from .data import is_correct, load_math, math_prompt
    from .sampling import sample

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    t0 = time.perf_counter()
    backbone, module, config = _setup(head, model, backbone, dtype)
    problems, report = load_math(data, limit=limit, seed=seed)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    t_gen = time.perf_counter()
    results = sample(backbone, [prompt_ids(backbone.tokenizer, math_prompt(p)) for p in problems], n=n, params=params,
                     seeds=[seed + j for j in range(len(problems))], feature_layers=(config.layer,),
                     batch_prompts=gen_batch, progress=progress, desc=f"sampling {n} per problem")
    gen_seconds = time.perf_counter() - t_gen

    last_number = extractor("last_number")
    hits: defaultdict[str, float] = defaultdict(float)
    examples: list[dict[str, Any]] = []
    for problem, result in zip(problems, results):
        cands = result.candidates
        feats = torch.stack([c.features[config.layer] for c in cands if c.features is not None])  # [n, d]
        r = head_rewards(module, feats)  # [n]
        found = [last_number(c.text) for c in cands]
        correct = [c.finish_reason == "stop" and is_correct(c.text, problem) for c in cands]
        picks = {policy: select(r[:, None], policy, found).order[0]
                 for policy in ("argmax", "weighted_vote", "majority_vote")}
        hits["pass@1"] += correct[0]
        hits["sample_accuracy"] += sum(correct) / len(cands)
        hits["head_pick"] += correct[picks["argmax"]]
        hits["weighted_vote"] += correct[picks["weighted_vote"]]
        hits["majority_vote"] += correct[picks["majority_vote"]]
        hits["oracle"] += any(correct)
        hits["finished"] += sum(c.finish_reason == "stop" for c in cands) / len(cands)
        hits["answered"] += sum(a is not None for a in found) / len(cands)
        if len(examples) < 3:
            examples.append({"question": problem.question[:200], "gold": problem.answer, "texts": [c.text for c in cands],
                             "answers": found,
                             "finished": [c.finish_reason == "stop" for c in cands],
                             "rewards": [round(float(x), 4) for x in r], "head_pick": picks["argmax"],
                             "weighted_vote": picks["weighted_vote"], "majority_vote": picks["majority_vote"]})
    m = len(problems)
    res = _base("bestofn", head, config, data, backbone)
    res.update(n=m, n_samples=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
               sampler="hf engine: problem j sampled as a request with seed + j")
    for key in ("pass@1", "sample_accuracy", "head_pick", "weighted_vote", "majority_vote", "oracle"):
        res[key] = hits[key] / m
        res[f"{key}_se"] = accuracy_se(hits[key] / m, m)
    res.update(
        finished_rate=hits["finished"] / m,
        answered_rate=hits["answered"] / m,
        report={"source": report.source, "read": report.total, "evaluated": m, "dropped": dict(report.dropped)},
        examples=examples,
        generate_seconds=round(gen_seconds, 2),
        seconds=round(time.perf_counter() - t0, 2),
    )
    return _write(res, out, config.name, "bestofn", data)


# --------------------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------------------

_METRICS = {
    "pairs": [("accuracy", "reward accuracy (r_w > r_l)"), ("mean_margin", "mean margin r_w - r_l"),
              ("mean_reward_chosen", "mean reward, chosen"), ("mean_reward_rejected", "mean reward, rejected"),
              ("ece", "calibration error of sigmoid(margin) (ECE)")],
    "choice": [("head_accuracy", "accuracy, pick by head reward"), ("logprob_accuracy", "accuracy, pick by avg log-prob"),
               ("logprob_sum_accuracy", "accuracy, pick by summed log-prob"), ("agreement", "head and avg log-prob agree"),
               ("chance", "chance"), ("ece", "ECE of sigmoid(correct - best wrong reward)")],
    "bestofn": [("pass@1", "pass@1 (first sample)"), ("sample_accuracy", "mean sample accuracy"),
                ("head_pick", "head pick (argmax reward)"), ("weighted_vote", "reward-weighted vote"),
                ("majority_vote", "majority vote"), ("oracle", "oracle pass@N"), ("finished_rate", "samples finished"),
                ("answered_rate", "samples with an extractable answer")],
}


def markdown(report: dict) -> str:
    """A short human summary of one eval report."""
    task = report.get("task", "?")
    lines = [
        f"# arbiter eval {task}: head `{report.get('head_name')}` on `{report.get('data')}`",
        "",
        f"- head: `{report.get('head')}` (pooler {report.get('head_pooler')}, layer {report.get('head_layer')}); "
        f"backbone {report.get('backbone')}",
        f"- items evaluated: {report.get('n')}" + (f", {report.get('n_samples')} samples each "
                                                   f"(temperature {report.get('temperature')}, max_new_tokens "
                                                   f"{report.get('max_new_tokens')})" if task == "bestofn" else ""),
        f"- time: {report.get('seconds')} s; created {report.get('created')}",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for key, label in _METRICS.get(task, []):
        v = report.get(key)
        if v is None:
            continue
        se = report.get(f"{key}_se")
        lines.append(f"| {label} | {v:.4f}" + (f" ± {se:.4f}" if se is not None and se == se else "") + " |")
    rep = report.get("report") or {}
    if rep:
        lines += ["", f"Data: {json.dumps(rep, sort_keys=True)}"]
    for name, fname in (report.get("plots") or {}).items():
        lines += ["", f"![{name}]({fname})"]
    return "\n".join(lines) + "\n"
