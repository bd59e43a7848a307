"""``arbiter train verifier``: a task head trained on the model's OWN samples, labelled right or wrong by an answer
extractor against gold answers (docs/methods.md "Verifier heads"; Cobbe et al. 2021's verifier, as a DPH head).

questions -> samples -> labels -> pairs -> heads -> rule -> report:
1. Questions with gold answers (builtins: sst2, commonsense_qa, arc_challenge, openbookqa, svamp, gsm8k; or a
   JSONL of ``{"question" | "messages", "answer"}`` with the config's extractor), de-duplicated by text, split
   train / dev / test by a hash of the question text (``verifier.split_of``).
2. ``n`` candidates per question through THE serving sampler (the HF engine the server runs, each question a
   request seeded by its text), with the serving features at the closing token of every candidate, in an
   on-disk sample cache (``verifier.SampleCache``): an interrupted run continues where it stopped.
3. Each candidate is right when its extracted answer equals the gold one (unanswered = wrong).
4. Pairs: a right vs a wrong candidate of one question (identical texts once; at most ``pairs_per_question``,
   balanced round-robin).
5. The head recipe's trainer (``head.train_on_features``) on those features, for every ``sweep`` variant.
   Answer-level pairs (docs/methods.md "Answer-level verification"): the gold answer vs each wrong answer the
   model sampled for the question, both rendered in the canonical form (``canonical``: "{answer}", or for
   lettered choices "{answer}. {option}") and read by one feature pass over prompt + canonical answer.
   ``levels`` says which heads to train: text (the candidates' own texts), answer (the canonical pairs),
   both (the two pair sets together).
6. For every variant and level, best-of-N on the dev questions under the server's selection code (argmax,
   weighted vote, majority over all N candidates as the server sees them; verify for heads that saw answer
   pairs, with its weights fitted on dev); the variant and rule with the best dev pick win. When that pick
   does not beat the best FREE rule on dev (the majority vote, or a training-free confidence rule of
   ``arbiter.confidence.RULES`` on the same candidates) by more than one paired standard error (``fallback``),
   the head's rule IS that free rule, and the report says so. The rule is written into the head
   (``selection``), so the server applies it by default.
7. The test questions (never trained on, never used to pick): n=1, each rule, oracle, wins / losses vs n=1,
   standard errors, in ``<out>/report.md`` (+ plots) and ``result.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arbiter.heads.config import NAME_PATTERN
from arbiter.training.config import ConfigError
from arbiter.training.head_trainer import HEAD_LOSSES, HeadTrainSettings, Variant, check_variant_fields

log = logging.getLogger("arbiter.training.recipes.verifier")
_NAME = re.compile(NAME_PATTERN)  # a head name (HeadConfig.name)

LEVELS = ("text", "answer", "both")  # the pair sets a verifier head can train on (module docstring, step 5)
ANSWER_NEGATIVES = ("sampled", "listed")  # the wrong answers an answer-level pair may take (VerifierConfig)
DESCRIPTION = "train a verifier head on the model's own samples (right vs wrong answers), with its selection rule"


def _default_sweep() -> list[Variant]:
    return [Variant(layer=layer, pooler=p, loss=loss, lr=lr)
            for layer in (-1, 20)
            for p, loss, lr in (("identity", "dph_contrastive", 1e-3), ("affine_tanh", "dph_contrastive", 1e-4))]


@dataclass
class VerifierConfig:
    """Config of ``arbiter train verifier`` (YAML + key=value overrides)."""

    name: str = "verifier"  # the head's name
    data: list[str] = field(default_factory=lambda: ["sst2"])  # question sources (builtins or JSONL files)
    limit: int | None = 1000  # questions per source (after the seeded shuffle and text de-duplication)
    seed: int = 0  # question order, request seeds, pairing
    # The answer extractor for user files (builtins bring theirs: label_words for sst2, choice_letter for the
    # multiple-choice sets, last_number for math): last_number | choice_letter | label_words | regex | json_field.
    extractor: str | None = None
    pattern: str | None = None  # extractor=regex
    answer_field: str | None = None  # extractor=json_field: the dotted path
    labels: list[str] | None = None  # extractor=label_words
    # Answer-level verification: the template an answer is scored in ({answer}; {option}: the listed text of an
    # option letter, from the row's "choices" or the question's lettered lines). None: the source's default
    # ("{answer}. {option}" for choice_letter, else "{answer}").
    canonical: str | None = None
    levels: list[str] = field(default_factory=lambda: ["text", "answer", "both"])  # which pair sets to train on
    answer_pairs_per_question: int = 3  # gold vs this many wrong answers: the model's own first, most frequent first
    # Which wrong answers pair with the gold one: "sampled" (only those the model gave) or "listed" (those first,
    # then the other answers of a closed set: the other labels, the other listed options; open answers such as
    # numbers have none, so they stay "sampled").
    answer_negatives: str = "listed"
    # More questions per source for the answer level only (>= limit; null: none): the training-split questions
    # beyond ``limit`` are not sampled, each pairs its gold answer with the other listed answers. Cheap (one
    # prompt-shared forward per question) where sampling is not; needs answer_negatives=listed and a closed set.
    answer_limit: int | None = None
    fallback: bool = True  # no dev gain beyond 1 SE over the best free rule: the head's rule is that free rule
    model: str | None = None  # backbone (None: the embedded SmolLM2-135M-Instruct)
    dtype: str = "auto"  # as the server: bfloat16 only where this CPU multiplies it natively and faster
    threads: int | None = None
    # Sampling: what the server does for a rerank request with these parameters.
    n: int = 8  # candidates per question
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    batch_prompts: int = 8  # questions per generation batch (x n rows)
    layers: list[int] = field(default_factory=lambda: [-1, 12, 20])  # features captured while sampling
    cache_dir: str | None = None  # sample cache (default ~/.cache/arbiter/samples)
    # Pairs and splits
    pairs_per_question: int = 4
    dev_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    # The head trainer (arbiter train head's keys) and its sweep
    layer: int = -1
    pooler: str = "identity"
    loss: str = "dph_contrastive"
    eps: float = 0.1
    dropout: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    epochs: int = 40
    batch_size: int = 64
    patience: int = 8
    sweep: list[Variant] = field(default_factory=_default_sweep)
    out: str = "runs/verifier"
    head_dir: str | None = None  # default <out>/head
    overwrite: bool = False
    progress: bool = True
    # Prefix-aware verifiers (arbiter train head's keys, docs/methods.md "Prefix-aware heads"): closed-prefix copies
    # of every right-vs-wrong pair of samples, read by one packed forward over the sampled tokens
    prefixes: int = 0
    prefix_min_tokens: int = 2
    train_prefixes: bool = True
    prefix_eval: list[int] = field(default_factory=list)
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])  # + tensorboard / wandb (training/trackers.py)

    def validate(self) -> None:
        from arbiter.training.trackers import check_report_to

        self.report_to = check_report_to(self.report_to)
        if self.prefixes < 0 or self.prefix_min_tokens < 1:
            raise ConfigError("prefixes must be >= 0 and prefix_min_tokens >= 1")
        if any(not isinstance(k, int) or k < 1 for k in self.prefix_eval):
            raise ConfigError(f"prefix_eval: token counts >= 1, got {self.prefix_eval}")
        if self.prefixes == 0 and any(v.train_prefixes for v in self.sweep):
            raise ConfigError("sweep: a variant trains on prefixes (train_prefixes: true) but prefixes is 0")
        from arbiter.answers import EXTRACTORS
        from arbiter.training.verifier import VERIFIER_BUILTINS, default_spec

        if not _NAME.fullmatch(self.name or ""):
            raise ConfigError(f"name: {self.name!r} must be 1-64 chars of letters, digits, '_', '.', '-' "
                              "starting with a letter or digit")
        if not self.data:
            raise ConfigError("data: give at least one source")
        for src in self.data:
            if src not in VERIFIER_BUILTINS and not Path(src).expanduser().is_file():
                raise ConfigError(f"data: {src!r} is neither an existing file nor a builtin ({', '.join(VERIFIER_BUILTINS)})")
            if default_spec(src) is None and self.extractor is None:
                raise ConfigError(f"data: {src!r} is a user file: set 'extractor' ({', '.join(EXTRACTORS)})")
        specs = {self.spec(s) for s in self.data}
        if len(specs) > 1:
            raise ConfigError(f"data: the sources read answers differently ({sorted(str(s) for s in specs)}); one head "
                              "has one selection rule, so train one verifier per kind of answer")
        if self.extractor is not None:
            if self.extractor not in EXTRACTORS:
                raise ConfigError(f"extractor: {self.extractor!r} is not one of {list(EXTRACTORS)}")
            try:
                self.spec(self.data[0]).fn()
            except ValueError as e:
                raise ConfigError(f"extractor {self.extractor}: {e}") from None
        if not self.levels or any(x not in LEVELS for x in self.levels) or len(set(self.levels)) < len(self.levels):
            raise ConfigError(f"levels: a non-empty list of distinct {list(LEVELS)}, got {self.levels}")
        if self.answer_pairs_per_question < 1:
            raise ConfigError(f"answer_pairs_per_question: must be >= 1, got {self.answer_pairs_per_question}")
        if self.answer_negatives not in ANSWER_NEGATIVES:
            raise ConfigError(f"answer_negatives: {self.answer_negatives!r} is not one of {list(ANSWER_NEGATIVES)}")
        if self.answer_limit is not None:
            spec = self.spec(self.data[0])
            if self.answer_negatives != "listed" or not set(self.levels) & {"answer", "both"}:
                raise ConfigError("answer_limit: the extra questions only give answer-level pairs against the listed "
                                  "answers: needs answer_negatives=listed and levels with answer or both")
            if not (spec.extractor == "choice_letter" or (spec.extractor == "label_words" and spec.labels)):
                raise ConfigError(f"answer_limit: {spec.extractor} answers are open (no listed set to pair the gold "
                                  "answer with); unsampled questions cannot be paired, drop answer_limit")
            if self.limit is None or self.answer_limit < self.limit:
                raise ConfigError(f"answer_limit: must be >= limit ({self.limit}), got {self.answer_limit}")
        if set(self.levels) & {"answer", "both"}:
            from arbiter.answers import check_canonical

            try:
                check_canonical(self.spec(self.data[0]).template or "", self.spec(self.data[0]).extractor)
            except ValueError as e:
                raise ConfigError(f"canonical: {e}") from None
        if self.limit is not None and self.limit < 4:
            raise ConfigError(f"limit: must be >= 4 or null, got {self.limit}")
        if self.n < 2:
            raise ConfigError(f"n: must be >= 2 (a pair needs a right and a wrong candidate), got {self.n}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ConfigError("temperature must be > 0 and top_p in (0, 1] (greedy candidates are all alike)")
        for k in ("max_tokens", "batch_prompts", "pairs_per_question", "epochs", "batch_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k}: must be >= 1, got {getattr(self, k)}")
        if not self.layers or any(l < -1 for l in self.layers):
            raise ConfigError(f"layers: give -1 (final norm) and/or block indices >= 0, got {self.layers}")
        if not 0 < self.dev_fraction < 1 or not 0 <= self.test_fraction < 1 or self.dev_fraction + self.test_fraction >= 0.9:
            raise ConfigError("dev_fraction in (0, 1) (the rule and variant are picked on dev), test_fraction in [0, 1), "
                              "together < 0.9")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype: {self.dtype!r} is not one of auto, float32, bfloat16, float16")
        check_variant_fields(self.pooler, self.loss, self.eps, self.lr, self.dropout, self.weight_decay, "")
        for i, v in enumerate(self.sweep):
            check_variant_fields(v.pooler, v.loss, v.eps, v.lr, v.dropout, v.weight_decay, f"sweep[{i}].")
            if (self.layer if v.layer is None else v.layer) not in self.layers:
                raise ConfigError(f"sweep[{i}].layer: {v.layer} is not among the sampled feature layers {self.layers}")
        if not self.sweep and self.layer not in self.layers:
            raise ConfigError(f"layer: {self.layer} is not among the sampled feature layers {self.layers}")
        if self.loss not in HEAD_LOSSES:
            raise ConfigError(f"loss: {self.loss!r} is not one of {list(HEAD_LOSSES)}")
        if not self.out:
            raise ConfigError("out: give a run directory")

    def spec(self, source: str) -> Any:
        from arbiter.training.verifier import DEFAULT_CANONICAL, AnswerSpec, default_spec

        if self.extractor is not None:
            return AnswerSpec(self.extractor, self.pattern, self.answer_field, tuple(self.labels) if self.labels else None,
                              finished_only=self.extractor == "last_number",
                              template=self.canonical or DEFAULT_CANONICAL.get(self.extractor, "{answer}"))
        spec = default_spec(source)
        return dataclasses.replace(spec, template=self.canonical) if spec is not None and self.canonical else spec

    def head_config(self) -> HeadTrainSettings:
        """The head trainer's settings (the keys this recipe shares with ``arbiter train head``)."""
        return HeadTrainSettings(name=self.name, seed=self.seed, layer=self.layer, pooler=self.pooler, loss=self.loss,
                                 eps=self.eps, dropout=self.dropout, lr=self.lr, weight_decay=self.weight_decay,
                                 epochs=self.epochs, batch_size=self.batch_size, patience=self.patience,
                                 sweep=list(self.sweep), progress=self.progress, train_prefixes=self.train_prefixes,
                                 report_to=list(self.report_to))


CONFIG = VerifierConfig


def add_arguments(parser: Any) -> None:
    parser.add_argument("--data", action="append", metavar="SRC", help="question source (repeatable; replaces 'data')")
    parser.add_argument("--limit", type=int, help="questions per source")
    parser.add_argument("--name", help="head name")
    parser.add_argument("--head-dir", dest="head_dir", metavar="DIR", help="where to write the head")


@dataclass
class RunData:
    """What the setup phase makes: the run directory, the questions and their splits, the model's samples with
    their labels, and the text-level pairs."""

    out: Path
    spec: Any  # verifier.AnswerSpec
    backbone: Any
    questions: list[Any]
    reports: dict[str, Any]
    split: list[str]  # per question: train / dev / test
    samples: list[Any]
    sampler: dict[str, Any]
    answers: list[list[str | None]]
    rights: list[list[bool]]
    pairs: list[Any]
    pair_stats: dict[str, int]
    idx: dict[str, list[int]]  # text-level pair indices per split
    qs_of: dict[str, list[int]]  # question indices per split
    labels_stats: dict[str, int]
    extra: list[Any] = field(default_factory=list)  # answer_limit: unsampled training questions (answer level only)

    def of(self, split: str, values: list[Any]) -> list[Any]:
        """``values`` (one per question) of the questions of ``split``."""
        return [values[q] for q in self.qs_of[split]]


@dataclass
class PrefixRows:
    """Closed-prefix features of one layer (``feature_cache.prefix_accuracy`` reads these two fields)."""

    prefix_chosen: Any
    prefix_rejected: Any


@dataclass
class Features:
    """Training features per layer: the text-level pairs (``by_layer``: chosen, rejected; closed-prefix copies
    follow the whole pairs), and the answer level."""

    sweep: list[Any]
    by_layer: dict[int, tuple[Any, Any]]
    prefix_rows: list[tuple[int, int, str]]
    prefix_train: list[int]
    answer: "AnswerLevel"

    def prefix_accuracy(self, data: RunData, head: Any, layer: int, split: str, k: int) -> float | None:
        from arbiter.training.feature_cache import prefix_accuracy

        fw, fl = self.by_layer[layer]
        n = len(data.pairs)
        return prefix_accuracy(head, PrefixRows(fw[n:], fl[n:]), self.prefix_rows, data.idx[split], k)[0]


@dataclass
class Trial:
    """One trained head (a sweep variant at one level) and what it does on the dev questions."""

    row: dict[str, Any]  # the report's row
    res: Any  # head_trainer.TrainResult
    rewards: list[Any]  # every candidate's reward, per question
    verified: list[dict[str, float | None]] | None  # every rendered answer's canonical reward, per question
    weights: Any  # selection.VerifyWeights (verify) or None
    dev: dict[str, Any]  # best_of_n on dev


def run(cfg: VerifierConfig, *, resume: bool = False, backbone: Any = None) -> dict:
    """Sample (or resume sampling), train the variants, pick variant and rule on dev, report on test, save the head:
    setup -> features -> train -> evaluate -> save."""
    t_start = time.perf_counter()
    data = _setup(cfg, resume, backbone)
    feats = _features(cfg, data)
    trials = [_train(cfg, data, feats, i, level) for i in range(len(feats.sweep)) for level in cfg.levels
              if level == "text" or feats.answer.pairs]
    best_i = max(range(len(trials)), key=lambda i: (trials[i].row["dev_pick"], trials[i].row["dev_pair_accuracy"] or 0.0, -i))
    metrics = _evaluate(cfg, data, feats, trials[best_i])
    return _save(cfg, data, feats, trials, best_i, metrics, t_start)


def _setup(cfg: VerifierConfig, resume: bool, backbone: Any) -> RunData:
    """The run directory, questions and splits, the model's samples (sampled or from the cache), labels, text pairs."""
    from arbiter.backbone import default_cache_dir, load_backbone
    from arbiter.generation.base import SamplingParams
    from arbiter.training import verifier as V
    from arbiter.training.rundir import prepare_run_dir

    out = prepare_run_dir(cfg.out, resume=resume, overwrite=cfg.overwrite, artifacts=("sweep",))
    shutil.rmtree(out / "sweep", ignore_errors=True)  # the heads retrain in seconds; only sampling resumes
    spec = cfg.spec(cfg.data[0])
    questions, reports = V.load_sources(cfg.data, limit=cfg.limit, seed=cfg.seed, spec=spec)
    split = [V.split_of(q.key, dev_fraction=cfg.dev_fraction, test_fraction=cfg.test_fraction, seed=cfg.split_seed)
             for q in questions]
    backbone = backbone or load_backbone(cfg.model, threads=cfg.threads, dtype=cfg.dtype)
    for l in cfg.layers:
        if l >= backbone.num_layers:
            raise ConfigError(f"layers: {l} is outside [-1, {backbone.num_layers - 1}] for {backbone.name}")
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    samples, sampler = V.sample_questions(
        backbone, questions, n=cfg.n, params=params, seed=cfg.seed, feature_layers=tuple(sorted(set(cfg.layers))),
        cache_dir=cfg.cache_dir or default_cache_dir() / "samples", batch_prompts=cfg.batch_prompts,
        progress=cfg.progress)
    sampler["plain_tokens_per_s"] = _plain_throughput(backbone, questions[: min(8, len(questions))], params)
    fn = spec.fn()
    labelled = [V.label(s, q.gold, spec, fn) for q, s in zip(questions, samples)]
    answers, rights = [a for a, _ in labelled], [r for _, r in labelled]
    pairs, pair_stats = V.make_pairs(questions, samples, rights, per_question=cfg.pairs_per_question, seed=cfg.seed)
    idx = {k: [i for i, p in enumerate(pairs) if split[p.question] == k] for k in ("train", "dev", "test")}
    if not idx["train"] or not idx["dev"]:
        raise ConfigError(f"too few pairs to train and pick a head: {pair_stats} (train {len(idx['train'])}, dev "
                          f"{len(idx['dev'])}); sample more questions (limit) or candidates (n)")
    qs_of = {k: [i for i, s in enumerate(split) if s == k] for k in ("train", "dev", "test")}
    labels_stats = {"candidates": sum(len(r) for r in rights), "right": sum(sum(r) for r in rights),
                    "unanswered": sum(a is None for aa in answers for a in aa)}
    log.info("questions %d (train %d, dev %d, test %d); candidates %d, right %d; pairs %d", len(questions),
             *(len(qs_of[k]) for k in ("train", "dev", "test")), labels_stats["candidates"], labels_stats["right"],
             len(pairs))
    extra: list[Any] = []
    if cfg.answer_limit is not None and cfg.answer_limit > (cfg.limit or 0):
        more, _ = V.load_sources(cfg.data, limit=cfg.answer_limit, seed=cfg.seed, spec=spec)
        known = {q.key for q in questions}
        extra = [q for q in more if q.key not in known and V.split_of(
            q.key, dev_fraction=cfg.dev_fraction, test_fraction=cfg.test_fraction, seed=cfg.split_seed) == "train"]
        log.info("answer_limit %d: %d more training questions for the answer level (not sampled)", cfg.answer_limit,
                 len(extra))
    return RunData(out, spec, backbone, questions, reports, split, samples, sampler, answers, rights, pairs, pair_stats,
                   idx, qs_of, labels_stats, extra)


def _features(cfg: VerifierConfig, data: RunData) -> Features:
    """The text pairs' features per sweep layer (from the sample cache), their closed-prefix copies (``prefixes``:
    one packed forward over the sampled tokens) and the answer level (``_answer_level``)."""
    import torch

    from arbiter.chat import prompt_ids
    from arbiter.training.data.records import TokenizedPair
    from arbiter.training.feature_cache import pair_features, prefix_cuts
    from arbiter.training.head_trainer import variants

    samples, pairs, bb = data.samples, data.pairs, data.backbone
    sweep = variants(cfg.head_config())
    by_layer = {l: (torch.stack([samples[p.question].features[l][p.chosen] for p in pairs]),
                    torch.stack([samples[p.question].features[l][p.rejected] for p in pairs]))
                for l in dict.fromkeys(v.layer for v in sweep)}
    prefix_rows: list[tuple[int, int, str]] = []
    prefix_train: list[int] = []
    if cfg.prefixes or cfg.prefix_eval:  # closed prefixes of the sampled answers (the head recipe's prefixes)
        pids: dict[int, list[int]] = {}
        tp = [TokenizedPair(pids.setdefault(p.question, prompt_ids(bb.tokenizer, data.questions[p.question].messages)),
                            [*samples[p.question].token_ids[p.chosen], bb.end_id],
                            [*samples[p.question].token_ids[p.rejected], bb.end_id]) for p in pairs]
        cuts, prefix_rows = prefix_cuts(tp, cfg.prefixes, cfg.prefix_min_tokens, cfg.prefix_eval, cfg.seed)
        train_set = set(data.idx["train"])
        prefix_train = [len(pairs) + j for j, (i, _, kind) in enumerate(prefix_rows) if kind == "random" and i in train_set]
        for l in list(by_layer):
            pf = pair_features(bb, tp, layer=l, max_length=0, cuts=cuts, progress=cfg.progress)
            assert pf.prefix_chosen is not None and pf.prefix_rejected is not None
            by_layer[l] = (torch.cat([by_layer[l][0], pf.prefix_chosen]), torch.cat([by_layer[l][1], pf.prefix_rejected]))
        log.info("closed prefixes: %d training copies, %d eval cuts", len(prefix_train),
                 sum(kind == "eval" for _, _, kind in prefix_rows))
    answer = _answer_level(cfg, bb, data.questions + data.extra, data.answers + [[] for _ in data.extra],
                           data.split + ["train"] * len(data.extra), data.spec, sorted({v.layer for v in sweep}))
    return Features(sweep, by_layer, prefix_rows, prefix_train, answer)


def _train(cfg: VerifierConfig, data: RunData, feats: Features, i: int, level: str) -> Trial:
    """Sweep variant ``i`` at ``level`` (text pairs, answer pairs or both): train the head, then best-of-N on the dev
    questions under the level's rules (verify with its weights fitted on dev)."""
    import torch

    from arbiter.heads import head_rewards
    from arbiter.training import verifier as V
    from arbiter.training.head_trainer import train_on_features

    v, al = feats.sweep[i], feats.answer
    fw, fl = feats.by_layer[v.layer]
    prefixed = bool(cfg.prefixes and v.train_prefixes)
    vidx = {**data.idx, "train": data.idx["train"] + feats.prefix_train} if prefixed else data.idx
    if level == "answer":
        (fw, fl), vidx = al.tensors(v.layer), al.idx
    elif level == "both":
        afw, afl = al.tensors(v.layer)
        vidx = {k: vidx[k] + [len(fw) + j for j in al.idx[k]] for k in ("train", "dev", "test")}
        fw, fl = torch.cat([fw, afw]), torch.cat([fl, afl])
    tag = f"{i:02d}-{v.pooler}-{v.loss}-layer{v.layer}-{level}" + ("-prefixes" if prefixed else "")
    res = train_on_features(v, fw, fl, vidx, fingerprint=data.backbone.fingerprint, ffn_size=data.backbone.ffn_size,
                            run_dir=data.out / "sweep" / tag, feature_dtype=data.backbone.dtype)
    rewards = _all_rewards(res.head, data.samples, v.layer, head_rewards)
    verified = None if level == "text" else V.verified_rewards(res.head, al.features[: len(data.questions)], v.layer,
                                                                head_rewards)
    dev_in = (data.of("dev", rewards), data.of("dev", data.answers), data.of("dev", data.rights))
    dev_verified = None if verified is None else data.of("dev", verified)
    weights = None if dev_verified is None else V.fit_verify_weights(*dev_in, dev_verified)[0]
    dev = V.best_of_n(*dev_in, dev_verified, weights, rules=LEVEL_RULES[level])
    rule = V.pick_rule(dev)
    row = {"variant": i, "level": level, "layer": v.layer, "pooler": v.pooler, "loss": v.loss, "lr": v.lr,
           "dev_pair_accuracy": res.metrics.get("dev_accuracy"), "train_pair_accuracy": res.metrics.get("train_accuracy"),
           "dev_rule": rule, "dev_pick": dev[rule]["accuracy"],
           **{f"dev_{r}": dev[r]["accuracy"] if r in dev else None for r in V.RULES},
           **({"verify_weights": dataclasses.asdict(weights)} if weights is not None else {}),
           **({"train_prefixes": prefixed} if cfg.prefixes else {}),
           **{f"dev_prefix_accuracy@{k}": feats.prefix_accuracy(data, res.head, v.layer, "dev", k) for k in cfg.prefix_eval}}
    log.info("variant %s: dev pair acc %.3f, dev pick %.3f (%s)", tag, res.metrics.get("dev_accuracy", float("nan")),
             dev[rule]["accuracy"], rule)
    return Trial(row, res, rewards, verified, weights, dev)


def _pair_accuracy(head: Any, fw: Any, fl: Any, rows: list[int]) -> float | None:
    import torch

    if not rows:
        return None
    with torch.no_grad():
        t = torch.tensor(rows)
        return float((head(fw[t]) > head(fl[t])).float().mean())


def _evaluate(cfg: VerifierConfig, data: RunData, feats: Features, best: Trial) -> dict[str, Any]:
    """The chosen trial's rule (or the fallback), then the test questions: every rule, the free confidence rules,
    oracle; pair accuracy on held-out text and answer pairs; prefix accuracy."""
    from arbiter import confidence
    from arbiter.heads import num_parameters
    from arbiter.training import verifier as V

    rule = best.row["dev_rule"]
    column = rule  # the rule's row in the report's tables
    dev_verified = None if best.verified is None else data.of("dev", best.verified)
    fallback = _fallback(cfg, data, rule, best.rewards, dev_verified, best.weights)
    free_rule: dict[str, Any] | None = None
    if fallback is not None:
        log.info("the chosen head's dev pick (%s) does not beat the best free rule beyond 1 SE: %s", rule, fallback)
        key = fallback["free_rule"]
        if key == "majority_vote":
            rule = column = "majority_vote"
        else:
            _, column, score, rule = next(r for r in confidence.RULES if r[0] == key)
            free_rule = {"score": score, "keep": confidence.KEEP.get(key) if rule == "deepconf_vote" else None}
    test = None
    if data.qs_of["test"]:
        test = V.best_of_n(data.of("test", best.rewards), data.of("test", data.answers), data.of("test", data.rights),
                           None if best.verified is None else data.of("test", best.verified), best.weights)
        # the free baselines from the same candidates (docs/methods.md "Confidence baselines")
        test.update(_confidence_rules(data.backbone, data.of("test", data.questions), data.of("test", data.samples),
                                      data.of("test", data.answers), data.of("test", data.rights)))
    layer, head, al = best.row["layer"], best.res.head, feats.answer
    prefix = {f"test_prefix_accuracy@{k}": feats.prefix_accuracy(data, head, layer, "test", k) for k in cfg.prefix_eval}
    return {**{k: best.res.metrics.get(k) for k in ("train_accuracy", "dev_accuracy", "n_train", "n_dev")},
            "test_pair_accuracy": _pair_accuracy(head, *feats.by_layer[layer], data.idx["test"]),
            "n_test_pairs": len(data.idx["test"]),
            "test_answer_pair_accuracy": _pair_accuracy(head, *al.tensors(layer), al.idx["test"]) if al.pairs else None,
            "n_test_answer_pairs": len(al.idx["test"]), "level": best.row["level"], "rule": rule, "fallback": fallback,
            "rule_column": column, "free_rule": free_rule,
            "dev_best_of_n": best.dev, "test_best_of_n": test, "parameters": num_parameters(head),
            **{k: v for k, v in prefix.items() if v is not None}}


def _provenance(cfg: VerifierConfig, data: RunData, feats: Features, trials: list[Trial], best: Trial,
                metrics: dict[str, Any]) -> dict[str, Any]:
    """How the head was made, as its config records it (``held_out_questions`` re-derives its splits from this)."""
    from arbiter.training.artifacts import command_line

    spec, v, out = data.spec, feats.sweep[best.row["variant"]], data.out
    return {
        "recipe": "verifier", "data": list(cfg.data), "limit": cfg.limit, "seed": cfg.seed,
        "answer_level": {"negatives": cfg.answer_negatives, "answer_limit": cfg.answer_limit,
                         "extra_train_questions": len(data.extra)},
        "answers": {"extractor": spec.extractor, "pattern": spec.pattern, "field": spec.field,
                    "labels": list(spec.labels) if spec.labels else None, "finished_only": spec.finished_only,
                    "template": spec.template},
        "sampling": {"n": cfg.n, "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
                     "engine": "hf", "dtype": data.backbone.dtype, "seed_rule": "verifier.question_seed(text, seed)"},
        "splits": {"by": "sha256 of the question text (verifier.split_of)", "dev_fraction": cfg.dev_fraction,
                   "test_fraction": cfg.test_fraction, "seed": cfg.split_seed,
                   "questions": {k: len(q) for k, q in data.qs_of.items()}},
        "layer": v.layer, "pooler": v.pooler, "loss": v.loss, "eps": v.eps, "lr": v.lr,
        "feature_dtype": data.backbone.dtype, "pairs": data.pair_stats, "answer_pairs": feats.answer.stats,
        "labels": data.labels_stats, "level": best.row["level"], "fallback": metrics.get("fallback"),
        "metrics": {k: x for k, x in metrics.items() if not isinstance(x, dict)},
        "test_best_of_n": metrics["test_best_of_n"], "sweep": [t.row for t in trials],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command_line(),
        "report_md": str((out / "report.md").resolve()),
        "plots": {"training curves": str((out / "training_curves.png").resolve()),
                  "test candidate rewards": str((out / "test_rewards.png").resolve())},
    }


def _save(cfg: VerifierConfig, data: RunData, feats: Features, trials: list[Trial], best_i: int,
          metrics: dict[str, Any], t_start: float) -> dict[str, Any]:
    """The head (with its rule and provenance), its card, the report and result.json."""
    from arbiter.heads import HeadConfig, SelectionRule, save_head
    from arbiter.heads.card import write_card
    from arbiter.training.artifacts import atomic_write_json
    from arbiter.training.rundir import RESULT_FILE

    best = trials[best_i]
    selection = SelectionRule(**data.spec.rule(metrics["rule"], best.weights, metrics.get("free_rule")))
    provenance = _provenance(cfg, data, feats, trials, best, metrics)
    head_config = HeadConfig(**{**best.res.head_config.model_dump(), "selection": selection,
                                "provenance": json.loads(json.dumps(provenance, default=str))})
    head_dir = Path(cfg.head_dir) if cfg.head_dir else data.out / "head"
    save_head(best.res.head, head_config, head_dir)
    metrics.update(head_dir=str(head_dir), total_seconds=round(time.perf_counter() - t_start, 1),
                   answer_pairs=feats.answer.stats)
    rows = [t.row for t in trials]
    _write_report(cfg, data, rows, best_i, best, metrics)
    write_card(head_dir)  # again, now that the report and plots it links exist
    atomic_write_json(data.out / RESULT_FILE, {"metrics": metrics, "sampler": data.sampler, "pairs": data.pair_stats,
                                                "labels": data.labels_stats, "data": data.reports, "variants": rows,
                                                "chosen": rows[best_i], "config": dataclasses.asdict(cfg)})
    test = metrics["test_best_of_n"]
    log.info("verifier head %r written to %s: rule %s, test %s", cfg.name, head_dir, metrics["rule"],
             test and {k: round(test[k]["accuracy"], 3) for k in ("n=1", metrics["rule_column"], "oracle")})
    return metrics


# The rules a head of each level is tried under on dev: a text-level head ranks candidates' texts; an answer-level
# head only ever saw canonical answers, so it verifies; a head of both may do either.
LEVEL_RULES = {"text": ("argmax", "weighted_vote", "majority_vote"), "answer": ("verify",),
               "both": ("argmax", "weighted_vote", "majority_vote", "verify")}


@dataclass
class AnswerLevel:
    """The answer-level pairs of a run (gold vs a sampled wrong answer, canonical form) and the features of every
    rendered answer of every question (what the verify rule scores on dev and test)."""

    pairs: list[Any]
    idx: dict[str, list[int]]  # pair indices per split
    features: list[dict[str, dict[int, Any]]]  # per question: answer -> layer -> [d]
    stats: dict[str, Any]

    def tensors(self, layer: int) -> tuple[Any, Any]:
        import torch

        return (torch.stack([self.features[p.question][p.chosen][layer] for p in self.pairs]),
                torch.stack([self.features[p.question][p.rejected][layer] for p in self.pairs]))


def _answer_level(cfg: VerifierConfig, backbone: Any, questions: list[Any], answers: list[list[str | None]],
                  split: list[str], spec: Any, layers: list[int]) -> AnswerLevel:
    """Render, pair and read the canonical answers (nothing when ``levels`` is text only)."""
    from arbiter.training import verifier as V

    if not set(cfg.levels) & {"answer", "both"}:
        return AnswerLevel([], {"train": [], "dev": [], "test": []}, [{} for _ in questions], {})
    listed = cfg.answer_negatives == "listed"
    canon, render_stats = V.canonical_answers(questions, answers, spec, listed=listed)
    if render_stats["unrendered_gold"]:
        log.warning("%d question(s) whose gold answer cannot be rendered as %r get no answer-level pair, e.g. %s",
                    render_stats["unrendered_gold"], spec.template, "; ".join(render_stats["examples"][:3]))
    pairs, pair_stats = V.make_answer_pairs(questions, answers, canon, per_question=cfg.answer_pairs_per_question,
                                            spec=spec if listed else None)
    idx = {k: [i for i, p in enumerate(pairs) if split[p.question] == k] for k in ("train", "dev", "test")}
    if not idx["train"]:
        log.warning("no answer-level training pairs (%s): training text-level heads only", pair_stats)
        pairs, idx = [], {"train": [], "dev": [], "test": []}
    # Read what is used: every answer of a dev / test question (verify ranks them there), only the paired answers of
    # a training question (the feature pass is the recipe's slowest step).
    paired: dict[int, set[str]] = {}
    for p in pairs:
        paired.setdefault(p.question, set()).update((p.chosen, p.rejected))
    used = [c if split[qi] != "train" else {a: t for a, t in c.items() if a in paired.get(qi, ())}
            for qi, c in enumerate(canon)]
    feats = V.canonical_features(backbone, questions, used, layers, progress=cfg.progress)
    log.info("answer-level: %d rendered answers, %d pairs (train %d, dev %d, test %d)", render_stats["rendered"],
             len(pairs), len(idx["train"]), len(idx["dev"]), len(idx["test"]))
    return AnswerLevel(pairs, idx, feats, {"template": spec.template, **pair_stats,
                                           **{k: v for k, v in render_stats.items() if k != "examples"}})


def _fallback(cfg: VerifierConfig, data: RunData, rule: str, all_rewards: list[Any], verified: list[Any] | None,
              weights: Any) -> dict[str, Any] | None:
    """Why the head's rule falls back to a free rule, or None: with ``fallback``, when the chosen rule's dev pick
    does not beat the best free rule on the same dev questions (the majority vote and every training-free rule of
    ``arbiter.confidence.RULES``; ties to the majority vote, then that order) by more than one paired standard
    error. The free rules' confidences come from one teacher-forced forward per dev candidate."""
    from arbiter import confidence
    from arbiter.training import verifier as V
    from arbiter.training.stats import paired_gain

    rewards, answers, rights = data.of("dev", all_rewards), data.of("dev", data.answers), data.of("dev", data.rights)
    if not cfg.fallback or rule == "majority_vote" or not rewards:
        return None
    mine = V.rule_right(rewards, answers, rights, rule, verified if rule == "verify" else None, weights)
    free = {"majority_vote": V.rule_right(rewards, answers, rights, "majority_vote"),
            **_confidence_right(data.backbone, data.of("dev", data.questions), data.of("dev", data.samples), answers,
                                rights)}
    best = max(free, key=lambda k: sum(free[k]))  # dicts keep order: ties to the majority vote, then RULES' order
    gain, se = paired_gain(mine, free[best])
    if gain > se:
        return None
    label = {key: name for key, name, _, _ in confidence.RULES}.get(best, best)
    return {"rule": rule, "dev_accuracy": sum(mine) / len(mine), "free_rule": best, "free_label": label,
            "dev_free": sum(free[best]) / len(free[best]),
            "dev_majority_vote": sum(free["majority_vote"]) / len(mine), "gain": gain, "se": se}


def _confidence_rules(backbone: Any, questions: list[Any], samples: list[Any], answers: list[Any],
                      rights: list[Any]) -> dict[str, Any]:
    """Best-of-N rows of the model's own confidence (arbiter.confidence) on the same candidates, by label."""
    from arbiter import confidence
    from arbiter.training.stats import accuracy_se

    label = {key: name for key, name, _, _ in confidence.RULES}
    right = {label[k]: r for k, r in _confidence_right(backbone, questions, samples, answers, rights).items()}
    n1 = [bool(r[0]) for r in rights]
    out = {}
    for name, r in right.items():
        acc = sum(r) / len(r)
        out[name] = {"accuracy": acc, "se": accuracy_se(acc, len(r)), "wins": sum(a and not b for a, b in zip(r, n1)),
                     "losses": sum(b and not a for a, b in zip(r, n1)), "free": True}
    return out


def _confidence_right(backbone: Any, questions: list[Any], samples: list[Any], answers: list[Any],
                      rights: list[Any]) -> dict[str, list[bool]]:
    """Per training-free rule (``confidence.RULES`` key): is its pick right, per question? One teacher-forced forward
    over each candidate's sampled tokens gives exactly the distributions they were drawn from."""
    from arbiter import confidence
    from arbiter.chat import prompt_ids

    right: dict[str, list[bool]] = {key: [] for key, _, _, _ in confidence.RULES}
    for q, s, aa, rr in zip(questions, samples, answers, rights):
        conf = confidence.candidate_confidence(backbone.model, prompt_ids(backbone.tokenizer, q.messages), s.token_ids)
        for key, pick in confidence.picks(conf, aa).items():
            right[key].append(bool(rr[pick]))
    return right


def _all_rewards(head: Any, samples: list[Any], layer: int, head_rewards: Any) -> list[Any]:
    """Rewards of every candidate of every question ([N] each), as the server scores them."""
    import torch

    flat = torch.cat([s.features[layer] for s in samples])  # [Q*N, d]
    r = head_rewards(head, flat)
    out, k = [], 0
    for s in samples:
        n = len(s.texts)
        out.append(r[k : k + n])
        k += n
    return out


def _plain_throughput(backbone: Any, questions: list[Any], params: Any) -> float | None:
    """Tokens/s of plain one-at-a-time requests (n=1, no features) on the same engine, for comparison with the
    sampler's batched candidates/s."""
    from arbiter.chat import prompt_ids
    from arbiter.training.sampling import sample

    if not questions:
        return None
    t0 = time.perf_counter()
    res = [sample(backbone, [prompt_ids(backbone.tokenizer, q.messages)], n=1, params=params, seeds=[j], progress=False)[0]
           for j, q in enumerate(questions)]
    dt = time.perf_counter() - t0
    return round(sum(len(c.token_ids) for r in res for c in r.candidates) / dt, 1) if dt > 0 else None


def _write_report(cfg: VerifierConfig, data: RunData, rows: list[dict], best_i: int, chosen: Trial, metrics: dict) -> None:
    from arbiter import confidence
    from arbiter.training import plots
    from arbiter.training.artifacts import METRICS_FILE, atomic_write_text
    from arbiter.training.verifier import RULES

    out, best, sampler, qs_of = data.out, chosen.res, data.sampler, data.qs_of
    pair_stats, labels_stats, rewards, rights = data.pair_stats, data.labels_stats, chosen.rewards, data.rights
    lines = [f"# arbiter train verifier: `{cfg.name}`", "",
             f"Data: {', '.join(cfg.data)} (limit {cfg.limit} per source, seed {cfg.seed}); questions train "
             f"{len(qs_of['train'])} / dev {len(qs_of['dev'])} / test {len(qs_of['test'])} (split by question text).",
             f"Sampling: n={cfg.n}, temperature {cfg.temperature}, top_p {cfg.top_p}, max_tokens {cfg.max_tokens} "
             f"(the serving HF engine); {labels_stats['candidates']} candidates, {labels_stats['right']} right, "
             f"{labels_stats['unanswered']} unanswered; pairs {pair_stats['pairs']} from {pair_stats['with_pairs']} "
             f"questions ({pair_stats['all_right']} all right, {pair_stats['all_wrong']} all wrong, "
             f"{pair_stats['duplicates']} duplicate texts).",
             f"Sampler: {sampler.get('questions_sampled')} questions sampled now in {sampler.get('sample_seconds')} s "
             f"({sampler.get('candidates_per_s')} candidates/s, {sampler.get('tokens_per_s')} tokens/s; plain one-at-a-"
             f"time n=1 requests on the same engine: {sampler.get('plain_tokens_per_s')} tokens/s); "
             f"{sampler.get('questions_cached_before')} came from the sample cache.", ""]
    for name in ("dev", "test"):
        t = metrics.get(f"{name}_best_of_n")
        if not t:
            continue
        lines += [f"Best-of-{cfg.n} on the {name} questions ({t['questions']}), the server's selection code"
                  + (" (the rule and variant were picked here, so optimistic)" if name == "dev" else " (held out)") + ":",
                  "", "| rule | accuracy | wins vs n=1 | losses vs n=1 |", "|---|---|---|---|"]
        for rname in ("n=1", *RULES, *(name for _, name, _, _ in confidence.RULES), "oracle"):
            if rname not in t:
                continue
            e = t[rname]
            mark = " (the head's rule)" if rname == metrics["rule_column"] else ""
            lines.append(f"| {rname}{mark} | {e['accuracy']:.3f} +- {e['se']:.3f} | {e.get('wins', '')} | "
                         f"{e.get('losses', '')} |")
        lines.append("")

    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    fb = metrics.get("fallback")
    if fb:
        lines += [f"**Fallback**: the chosen head's dev pick ({fb['rule']} {fb['dev_accuracy']:.3f}) does not beat the "
                  f"best free rule on dev, {fb['free_label']} ({fb['dev_free']:.3f}; majority vote "
                  f"{fb['dev_majority_vote']:.3f}), by more than one paired standard error (gain {fb['gain']:+.3f} +- "
                  f"{fb['se']:.3f}), so the head's rule is that free rule: the head does not help on this task.", ""]
    if metrics.get("answer_pairs"):
        a = metrics["answer_pairs"]
        lines += [f"Answer-level pairs (the gold answer vs a wrong one, rendered as `{a['template']}`; wrong answers "
                  f"the model sampled first, then with `answer_negatives: {cfg.answer_negatives}` the other listed "
                  f"answers): {a['pairs']} from {a['with_pairs']} questions ({a.get('sampled_pairs', a['pairs'])} "
                  f"against a sampled mistake, {a.get('listed_pairs', 0)} against another listed answer; "
                  f"{len(data.extra)} training questions beyond `limit` read unsampled for this level "
                  f"(`answer_limit: {cfg.answer_limit}`); {a['never_wrong']} without a wrong answer to pair, "
                  f"{a['gold_unrendered']} whose gold answer cannot be rendered; {a['unrendered_samples']} sampled "
                  "answers not renderable).", ""]
    lines += ["Pairwise accuracy of the chosen head (level `{}`): its own training pairs train {}, dev {}; held-out test "
              "text pairs {}, answer pairs {}.".format(
                  metrics.get("level"), cell(metrics.get("train_accuracy")), cell(metrics.get("dev_accuracy")),
                  cell(metrics.get("test_pair_accuracy")), cell(metrics.get("test_answer_pair_accuracy"))),
              "", "Variants x levels (picked by the dev best-of-N pick under their best rule, then dev pair accuracy; "
              "verify's weights are fitted on dev too):", "",
              "| variant | level | layer | pooler | loss | lr | dev pairs | dev argmax | dev weighted | dev majority | "
              "dev verify | rule |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        lines.append(f"| {r['variant']}{' (chosen)' if i == best_i else ''} | {r['level']} | {r['layer']} | "
                     f"{r['pooler']} | {r['loss']} | {r['lr']} | {cell(r['dev_pair_accuracy'])} | {cell(r['dev_argmax'])} "
                     f"| {cell(r['dev_weighted_vote'])} | {cell(r['dev_majority_vote'])} | {cell(r['dev_verify'])} | "
                     f"{r['dev_rule']} |")
    split = "test" if qs_of["test"] else "dev"
    good = [float(rewards[q][i]) for q in qs_of[split] for i in range(len(rights[q])) if rights[q][i]]
    bad = [float(rewards[q][i]) for q in qs_of[split] for i in range(len(rights[q])) if not rights[q][i]]
    figs = {"training curves": plots.safely(plots.training_curves, best.run_dir / METRICS_FILE, out / "training_curves.png",
                                            f"verifier {cfg.name} (chosen variant)"),
            f"{split} candidate rewards": plots.safely(plots.reward_histograms, good, bad, out / f"{split}_rewards.png",
                                                       f"{cfg.name}: {split} candidates", ("right", "wrong"))}
    for name, path in figs.items():
        if path is not None:
            lines += ["", f"![{name}]({Path(path).name})"]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")

