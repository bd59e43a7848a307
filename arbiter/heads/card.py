"""Head model cards: ``<head dir>/README.md``, written beside the two files a head is (``io.save_head``).

A card says what the head scores, what it reads (backbone fingerprint, layer, pooler, feature dtype), the rule
the server applies with it, the data and command that made it, its held-out accuracy, end-to-end figures when a
benchmark report gives them, and links to its plots. It is rendered from ``head_config.json`` alone (plus the
optional benchmark JSON), so ``arbiter heads card <dir>`` regenerates it at any time; the loader never reads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .config import HeadConfig

CARD_FILE = "README.md"

_RECIPES = {
    "head": "a preference head: trained on pairs (a preferred vs a rejected answer to the same prompt) to give the "
            "preferred answer the higher reward",
    "verifier": "a verifier: trained on the backbone's own sampled answers, labelled right or wrong against gold "
                "answers, to give right answers the higher reward",
    "joint": "a preference head trained jointly with a LoRA adapter (cDPO + DPH)",
}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v) or "-"
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True)
    return "-" if v is None else str(v)


def _reads(config: HeadConfig) -> str:
    where = "the final norm's output" if config.layer == -1 else f"block {config.layer}'s raw output"
    return f"{where} at the token that closes the answer (`{config.backbone.end_token}`)"


def end_to_end_rows(report: dict[str, Any], name: str) -> list[tuple[str, str]]:
    """(label, figure) rows for head ``name`` from a benchmark report JSON: ``bestofn_api.json`` (accuracy of each
    policy through the API, per task whose head is ``name``)."""
    rows: list[tuple[str, str]] = []
    results = report.get("results", {})
    meta = report.get("meta", {})
    for task, r in results.items() if isinstance(results, dict) else ():
        if not isinstance(r, dict) or r.get("head") != name:
            continue
        n = r.get("questions")
        for key, label in (("n1", "a single sample (n=1)"), ("head_rule", "best-of-N, the head's rule"),
                           ("argmax", "best-of-N, argmax"), ("weighted_vote", "best-of-N, weighted vote"),
                           ("majority_vote", "best-of-N, majority vote"),
                           ("conf_logprob", "best-of-N, mean log-prob argmax (free)"),
                           ("conf_deepconf", "best-of-N, DeepConf confidence argmax (free)"),
                           ("conf_deepconf_vote", "best-of-N, DeepConf weighted vote (free)"),
                           ("conf_self_certainty", "best-of-N, self-certainty argmax (free)"),
                           ("oracle", "oracle (any right)")):
            cell = r.get(key)
            if isinstance(cell, dict) and "acc" in cell:
                rows.append((f"{task}: {label}", f"{cell['acc']:.3f} +- {cell.get('se', 0):.3f} ({n} questions)"))
        run = r.get("run") if isinstance(r.get("run"), dict) else meta
        if rows and run:
            rows.append((f"{task}: measured", f"N={meta.get('n')}, commit {str(run.get('commit', '?'))[:10]}, "
                                              f"`{run.get('command', '?')}`"))
    return rows


def render_card(config: HeadConfig, head_dir: str | os.PathLike[str] | None = None,
                end_to_end: list[tuple[str, str]] | None = None, source: str | None = None,
                command: str | None = None) -> str:
    """The card's markdown. ``head_dir``: where the card will live (plot links are made relative to it);
    ``end_to_end``: rows from :func:`end_to_end_rows`; ``source``: the benchmark report they came from;
    ``command``: the command that made the head when its provenance does not record one (heads made before it did)."""
    prov = dict(config.provenance or {})
    recipe = prov.get("recipe")
    data = prov.get("data")
    lines = [f"# Head `{config.name}`", ""]
    what = _RECIPES.get(str(recipe), "a Direct Preference Head")
    lines += [f"A Direct Preference Head (pooler `{config.pooler}` and a reward vector on the backbone's hidden state): "
              f"{what}" + (f", on {_fmt(data)}." if data else "."),
              "", "Serve it from a heads directory (`ARBITER_HEADS_DIR`) or `POST /v1/admin/heads`, and name it in a "
              f"request: `\"rerank\": {{\"heads\": [\"{config.name}\"]}}`. Higher reward = better answer.", ""]
    sel = config.selection
    rule = "argmax (no rule of its own)" if sel is None else (
        f"`{sel.select}`" + (f" with the `{sel.extractor}` answer extractor" if sel.extractor else "")
        + (f", each distinct answer scored as `{sel.canonical}`" + (
            f" (+ {sel.vote_weight:g} x vote share)" if sel.vote_weight else "")
            + (f" (+ {sel.text_weight:g} x best text reward)" if sel.text_weight else "")
            if sel.select == "verify" and sel.canonical else ""))
    lines += ["| | |", "|---|---|",
              f"| backbone | {config.backbone.model_name} (hidden {config.backbone.hidden_size}, {config.backbone.num_layers} "
              f"layers, vocabulary hash `{config.backbone.vocab_hash}`) |",
              f"| reads | {_reads(config)} |",
              f"| pooler | `{config.pooler}`, dropout {config.dropout} |",
              f"| feature dtype | {config.feature_dtype} (the backbone dtype it was trained on) |",
              f"| selection rule | {rule}: what a request naming this head first gets unless it sets `select` |"]
    pref = prov.get("prefixes")
    if isinstance(pref, dict):
        lines.append(f"| prefixes | trained on {pref.get('copies')} closed-prefix copies per pair too "
                     f"(`trained`: {pref.get('trained')}): for pruning's partial rewards |")
    lines += ["", "## How it was made", ""]
    if prov.get("command") or command:
        lines += ["```bash", str(prov.get("command") or command), "```", ""]
    made = [("recipe", recipe), ("data", data), ("limit", prov.get("limit")), ("seed", prov.get("seed")),
            ("splits", prov.get("splits")), ("loss", prov.get("loss")), ("eps", prov.get("eps")),
            ("optimizer", prov.get("optimizer")), ("lr", prov.get("lr") if "optimizer" not in prov else None), ("sampling", prov.get("sampling")),
            ("pairs", prov.get("pairs")), ("commit", prov.get("commit")), ("created", prov.get("created"))]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in made if v is not None]
    metrics = prov.get("metrics") or {}
    if metrics:
        lines += ["", "## How good it is (held-out splits of its data)", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items()]
    bon = prov.get("test_best_of_n")
    if isinstance(bon, dict):
        lines += ["", f"Best-of-N on the {bon.get('questions')} test questions (the recipe's report):", "",
                  "| policy | accuracy +- SE | wins / losses vs n=1 |", "|---|---|---|"]
        for k, v in bon.items():
            if isinstance(v, dict) and "accuracy" in v:
                wl = f"{v['wins']} / {v['losses']}" if "wins" in v else "-"
                lines.append(f"| {k} | {v['accuracy']:.3f} +- {v.get('se', 0):.3f} | {wl} |")
    if end_to_end:
        lines += ["", "## End to end, through the API" + (f" (`{source}`)" if source else ""), "",
                  "| | |", "|---|---|"] + [f"| {a} | {b} |" for a, b in end_to_end]
    plots = prov.get("plots") or {}
    report = prov.get("report_md")
    if (plots or report) and head_dir is not None:
        base = Path(head_dir).resolve()
        lines += ["", "## Plots and report", ""]
        if report and Path(report).is_file():
            lines.append(f"- [training report]({os.path.relpath(Path(report).resolve(), base)})")
        for title, path in plots.items():
            if Path(path).is_file():
                lines.append(f"- [{title}]({os.path.relpath(Path(path).resolve(), base)})")
    lines += ["", f"Card written by `arbiter heads card` from `head_config.json` (format {config.format_version}); the "
                  "loader reads only `head_config.json` and `head.safetensors`."]
    return "\n".join(lines) + "\n"


def write_card(head_dir: str | os.PathLike[str], *, report: dict[str, Any] | None = None, source: str | None = None,
               plots_dir: str | os.PathLike[str] | None = None, command: str | None = None) -> Path:
    """(Re)write ``<head_dir>/README.md`` from its ``head_config.json``; ``report``: a benchmark JSON whose rows for
    this head go in the end-to-end section (``source``: its path, shown); ``plots_dir``: a directory whose
    ``report.md`` and PNG files the card links (e.g. the committed copy of the training report)."""
    from .io import read_config

    d = Path(head_dir)
    config = read_config(d)
    if plots_dir is not None:
        pd = Path(plots_dir)
        prov = dict(config.provenance or {})
        prov["report_md"] = str(pd / "report.md") if (pd / "report.md").is_file() else None
        prov["plots"] = {p.stem.replace("_", " "): str(p) for p in sorted(pd.glob("*.png"))}
        config = config.model_copy(update={"provenance": prov})
    rows = end_to_end_rows(report, config.name) if report else None
    path = d / CARD_FILE
    tmp = path.with_name(f".{CARD_FILE}.tmp")
    tmp.write_text(render_card(config, d, rows, source, command))
    os.replace(tmp, path)  # whole or absent, as every artifact
    return path
