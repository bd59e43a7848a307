"""Head model cards (``arbiter/heads/card.py``): every saved head gets a README.md the loader tolerates and never
reads; ``arbiter heads show / card / list`` print, rewrite and list; the shipped heads carry cards."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from arbiter.cli import main
from arbiter.heads import BackboneFingerprint, HeadConfig, SelectionRule, build_head, load_head, save_head

ROOT = Path(__file__).resolve().parents[1]
FP = BackboneFingerprint(model_name="toy", hidden_size=8, num_layers=4, vocab_hash="0123456789abcdef")


def toy(tmp_path: Path, name: str = "toy", **prov) -> Path:
    cfg = HeadConfig(name=name, backbone=FP, layer=2, pooler="affine_tanh", hidden_size=8,
                     selection=SelectionRule(select="weighted_vote", extractor="choice_letter"),
                     provenance={"recipe": "verifier", "data": ["arc_challenge"], "command": "arbiter train verifier x=1",
                                 "metrics": {"test_pair_accuracy": 0.6125, "n_test_pairs": 80}, **prov})
    torch.manual_seed(0)
    return save_head(build_head(cfg), cfg, tmp_path / name)


def test_a_saved_head_has_a_card_that_says_what_it_is_and_loads_unchanged(tmp_path):
    d = toy(tmp_path)
    card = (d / "README.md").read_text()
    for fact in ("# Head `toy`", "block 2's raw output", "`affine_tanh`", "`weighted_vote` with the `choice_letter`",
                 "arbiter train verifier x=1", "| test_pair_accuracy | 0.6125 |", "vocabulary hash `0123456789abcdef`"):
        assert fact in card, fact
    head, cfg = load_head(d, expected_backbone=FP)  # the card is tolerated, never read
    assert cfg.name == "toy"
    (d / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="unexpected files"):
        load_head(d, expected_backbone=FP)


def test_heads_card_adds_end_to_end_rows_from_a_benchmark_report_and_links_plots(tmp_path, capsys):
    d = toy(tmp_path, name="sst2")
    report = ROOT / "benchmarks" / "reports" / "bestofn_api.json"
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "report.md").write_text("# r\n")
    (plots / "training_curves.png").write_bytes(b"\x89PNG")
    assert main(["heads", "card", str(d), "--e2e", str(report), "--plots", str(plots)]) == 0
    card = (d / "README.md").read_text()
    res = json.loads(report.read_text())["results"]["sst2"]
    for key in ("n1", "argmax", "oracle"):  # the report's own figures, as printed
        assert f"{res[key]['acc']:.3f} +- {res[key]['se']:.3f} ({res['questions']} questions)" in card
    links = re.findall(r"\]\(([^)]+)\)", card)
    assert sorted(Path(x).name for x in links) == ["report.md", "training_curves.png"]
    assert all((d / x).resolve().is_file() for x in links)  # relative to the card
    capsys.readouterr()
    assert main(["heads", "show", str(d)]) == 0
    assert capsys.readouterr().out == card


def test_heads_list_names_each_head_and_what_cannot_load(tmp_path, capsys):
    toy(tmp_path, name="alpha")
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "head_config.json").write_text("{}")
    assert main(["heads", "list", "--heads-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:4] == ["alpha", "2", "affine_tanh", "weighted_vote"] and "0.613" in out[1]
    assert out[2].startswith("broken") and "not loadable" in out[2]
    assert main(["heads", "show", str(tmp_path / "nope")]) == 2


@pytest.mark.parametrize("name", ["helpful", "helpful_prefix", "math", "mc", "sst2"])
def test_the_shipped_heads_carry_cards_that_match_their_configs(name):
    d = ROOT / "heads" / name
    if not d.exists():
        pytest.skip(f"heads/{name} is not shipped")
    cfg = json.loads((d / "head_config.json").read_text())
    card = (d / "README.md").read_text()
    assert f"# Head `{name}`" in card and f"| pooler | `{cfg['pooler']}`" in card
    rule = (cfg.get("selection") or {}).get("select")
    assert rule is None or f"`{rule}`" in card
    assert "```bash\narbiter train" in card  # the command that made it
    for link in re.findall(r"\]\(([^)]+)\)", card):
        assert (d / link).resolve().is_file(), link
