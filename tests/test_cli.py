"""``arbiter train`` / ``arbiter eval`` argument handling: help, lazy dispatch, config errors exit 2 early."""

from __future__ import annotations

import subprocess
import sys

import pytest

from arbiter.training import cli


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "arbiter.training.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_help_via_subprocess_lists_everything():
    top = _run("train", "--help")
    assert top.returncode == 0, top.stderr
    for name in cli.RECIPES:
        assert name in top.stdout
    head = _run("train", "head", "--help")
    assert head.returncode == 0, head.stderr
    for key in ("--config", "--resume", "--out", "--data", "dev_fraction", "pooler", "loss", "eps", "patience",
                "checkpoint_every", "sweep", "select_metric"):
        assert key in head.stdout, key
    ev = _run("eval", "--help")
    assert ev.returncode == 0 and all(t in ev.stdout for t in ("pairs", "choice", "bestofn"))
    bon = _run("eval", "bestofn", "--help")
    assert bon.returncode == 0 and "--n " in bon.stdout and "--max-new-tokens" in bon.stdout


@pytest.fixture
def no_model(monkeypatch):
    """Fail loudly if anything tries to load a model: config errors must come first."""
    import arbiter.backbone

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(arbiter.backbone, "load_backbone", boom)


@pytest.mark.parametrize(
    "argv, field",
    [
        (["lr=abc"], "lr"),
        (["eps=0.7"], "eps"),
        (["pooler=mlp"], "pooler"),
        (["loss=dpo"], "loss"),
        (["bogus_key=1"], "bogus_key"),
        (["dev_fraction=1.5"], "dev_fraction"),
        (["dtype=fp8"], "dtype"),
        (["data=[/no/such/file.jsonl]"], "data"),
        (["--limit", "1"], "limit"),
        (["sweep=[{pooler: nope}]"], "sweep[0].pooler"),
        (["--config", "/no/such/config.yaml"], "config"),
    ],
)
def test_config_errors_exit_2_naming_the_field(argv, field, no_model, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["head", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert field in err and "error" in err


def test_unknown_or_missing_recipe_is_a_clear_usage_error(monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["nope"])
    assert e.value.code == 2 and "unknown recipe 'nope'" in capsys.readouterr().err
    monkeypatch.setitem(cli.RECIPES, "ghost", ("arbiter.training.recipes.ghost", "not written yet"))
    with pytest.raises(SystemExit) as e:
        cli.main(["ghost", "lr=1"])
    assert e.value.code == 2 and "recipe 'ghost' is not available" in capsys.readouterr().err


def test_options_and_out_become_config_overrides(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("name: from_yaml\nlr: 0.5\nepochs: 3\n")
    module, cfg, args = cli.load_recipe_config(
        "head", ["--config", str(yaml_file), "lr=0.01", "--data", "hh-rlhf/helpful-online", "--data", "pandalm",
                 "--limit", "7", "--out", str(tmp_path / "o"), "--resume", "sweep=[{pooler: affine_tanh}]"])
    assert module.CONFIG is type(cfg)
    assert (cfg.name, cfg.lr, cfg.epochs, cfg.limit) == ("from_yaml", 0.01, 3, 7)
    assert cfg.data == ["hh-rlhf/helpful-online", "pandalm"] and cfg.out == str(tmp_path / "o") and args.resume
    assert cfg.sweep[0].pooler == "affine_tanh" and cfg.sweep[0].loss is None


def test_packaged_configs_are_valid_and_resolve_by_name():
    for name in ("head", "head_helpful"):
        _, cfg, _ = cli.load_recipe_config("head", ["--config", name])
        assert cfg.epochs >= 1
    _, helpful, _ = cli.load_recipe_config("head", ["--config", "head_helpful"])
    assert helpful.head_dir == "heads/helpful" and helpful.data == ["hh-rlhf"] and helpful.test_fraction > 0
    assert {v.pooler for v in helpful.sweep} == {"identity", "affine_tanh"}
    assert {v.loss for v in helpful.sweep} == {"dph_separable", "dph_contrastive"}


def test_eval_argument_errors_exit_2_before_any_model_loads(tmp_path, no_model, capsys):
    with pytest.raises(SystemExit) as e:
        cli.eval_main(["pairs", "--head", str(tmp_path / "missing"), "--data", "hh-rlhf"])
    assert e.value.code == 2 and "--head" in capsys.readouterr().err
    from arbiter.heads import BackboneFingerprint, HeadConfig, build_head, save_head

    fp = BackboneFingerprint(model_name="m", hidden_size=8, num_layers=2, vocab_hash="0123456789abcdef")
    cfg = HeadConfig(name="h", backbone=fp, hidden_size=8)
    save_head(build_head(cfg), cfg, tmp_path / "h")
    for argv, needle in (
        (["choice", "--head", str(tmp_path / "h"), "--data", "hh-rlhf"], "multiple-choice"),
        (["bestofn", "--head", str(tmp_path / "h"), "--data", "gsm8k", "--n", "0"], "--n"),
        (["bestofn", "--head", str(tmp_path / "h"), "--data", "commonsense_qa"], "math"),
        (["pairs", "--head", str(tmp_path / "h"), "--data", "/no/file.jsonl"], "--data"),
    ):
        with pytest.raises(SystemExit) as e:
            cli.eval_main(argv)
        assert e.value.code == 2
        assert needle in capsys.readouterr().err
