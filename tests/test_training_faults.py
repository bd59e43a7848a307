"""Training under faults, through the real CLI and the real tiny model (issue "Hardening", training half).

- ``kill -9`` in the middle of ``arbiter train head`` (a real subprocess), then ``--resume``: the run continues
  from its last checkpoint and ends with bit-identical weights to an uninterrupted run (also for
  ``arbiter train adapter``, marked slow).
- A killed run leaves nothing partial where a loader would look: no head dir (or a loadable one); half-written
  checkpoint dirs (a step dir without state.json, a leftover atomic ``.tmp`` dir) are ignored by
  ``latest_checkpoint`` and the resume still lands on the uninterrupted weights.
- Corrupted caches: the head feature cache is covered by test_head_recipe.py
  (test_corrupted_cache_is_detected_and_rebuilt), the SAE reference-feature cache by test_sae.py
  (test_reference_cache_hit_and_corruption_rebuild), tampered reference token ids by test_adapter_recipe.py
  (test_ref_columns_equal_base_model_logps). Here: a truncated reference parquet is a clear exit-2 data error.
- NaN loss at the recipe level is covered by test_head_recipe.py / test_adapter_recipe.py; here through the CLI:
  exit code 1, a message naming the step and the last good checkpoint, which is kept.
- Bad data rows through the CLI: counted per reason with examples in result.json and the head's provenance;
  a file with zero usable rows exits 2 with the per-reason counts.

Features of 16 short real hh-rlhf pairs are computed once per module (in-process, one backbone pass) into a
module cache dir; every subprocess run reads them from that cache, so a head run costs a process start,
a model load (~6 s) and milliseconds of training per step.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

MAX_LEN = 96
N_PAIRS = 16


@pytest.fixture(scope="module")
def tiny_pairs_file(tmp_path_factory, short_hh_pairs):
    """TRL-format JSONL of the first 16 pairs of the seeded hh-rlhf order that fit in MAX_LEN tokens."""
    from arbiter.training.data import save_pairs

    keep = short_hh_pairs(N_PAIRS, MAX_LEN, seed=0)
    assert len(keep) == N_PAIRS
    return save_pairs(keep, tmp_path_factory.mktemp("faults_data") / "tiny_hh.jsonl")


@pytest.fixture(scope="module")
def cache_dir(tiny_pairs_file, backbone, tmp_path_factory):
    """A feature cache holding the tiny set's features exactly as the head recipe will ask for them."""
    from arbiter.training.data.splits import load_tokenized
    from arbiter.training.feature_cache import pair_features
    from arbiter.training.recipes.head import HeadRecipeConfig

    d = tmp_path_factory.mktemp("faults_features")
    cfg = HeadRecipeConfig(data=[str(tiny_pairs_file)], max_length=MAX_LEN, cache_dir=str(d), progress=False)
    tok, _ = load_tokenized(cfg, backbone.tokenizer, backbone.end_id)
    assert pair_features(backbone, tok, max_length=MAX_LEN, cache_dir=d, progress=False).status == "miss"
    return d


# One intra-op torch thread for the whole module (shared fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _env() -> dict:
    # One intra-op thread: the 2 shared cores; and identical settings in every process being compared.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1"}


def _head_argv(data, cache_dir, out, *extra) -> list[str]:
    # Dropout makes the restored global RNG matter; a dev set makes best-weights tracking and per-epoch
    # evaluation part of the trajectory; patience 0 keeps it from stopping early. dtype=float32: the module's
    # cache holds float32 features (dtype=auto would pick bfloat16 on a CPU with AMX and miss it).
    return [sys.executable, "-m", "arbiter.cli", "train", "head", "--out", str(out), f"data=[{data}]",
            f"max_length={MAX_LEN}", f"cache_dir={cache_dir}", "dtype=float32", "dev_fraction=0.25", "seed=0", "lr=1e-2",
            "dropout=0.1", "batch_size=4", "patience=0", "epochs=100000", "threads=1", "progress=false", "name=tiny",
            *extra]


def _run(argv, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=_env())


def _step(ck: Path | None) -> int:
    return int(ck.name.split("-")[1]) if ck is not None else -1


def _kill_after_first_checkpoint(argv, run_dir: Path, timeout: float = 120.0) -> int:
    """Start ``argv``, SIGKILL it as soon as a checkpoint exists under ``run_dir``; returns that checkpoint's step."""
    from arbiter.training.checkpoint import latest_checkpoint

    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.monotonic() + timeout
        while latest_checkpoint(run_dir) is None:
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc {proc.returncode}) before any checkpoint: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no checkpoint under {run_dir} after {timeout} s")
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return _step(latest_checkpoint(run_dir))


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------------------
# 1 + 2: kill -9 mid-run, no partial artifact, half-written checkpoints ignored, resume == uninterrupted
# --------------------------------------------------------------------------------------------------

HEAD_STEPS, HEAD_EVERY = 1200, 30


def test_head_kill9_then_resume_equals_uninterrupted_and_leaves_nothing_partial(tiny_pairs_file, cache_dir,
                                                                               backbone, tmp_path):
    from arbiter.heads import load_head
    from arbiter.training.checkpoint import latest_checkpoint

    steps = (f"max_steps={HEAD_STEPS}", f"checkpoint_every={HEAD_EVERY}")
    full = _run(_head_argv(tiny_pairs_file, cache_dir, tmp_path / "full", *steps))
    assert full.returncode == 0, full.stderr[-3000:]
    m_full = json.loads((tmp_path / "full" / "result.json").read_text())["metrics"]
    assert m_full["feature_cache"] == "hit" and m_full["steps"] == HEAD_STEPS

    run_dir = tmp_path / "killed"
    killed_at = _kill_after_first_checkpoint(_head_argv(tiny_pairs_file, cache_dir, run_dir, *steps), run_dir)
    # The kill landed mid-run: a checkpoint exists, the run had not finished, no result was written.
    assert 0 < killed_at < HEAD_STEPS and killed_at % HEAD_EVERY == 0, killed_at
    assert not (run_dir / "result.json").exists()
    # No partial head where a loader would look: the head dir is absent, or complete and loadable.
    if (run_dir / "head").exists():
        load_head(run_dir / "head", expected_backbone=backbone.fingerprint)
    ck_dir = run_dir / "checkpoints"
    for ck in ck_dir.iterdir():  # every step-N dir latest_checkpoint could pick is complete
        if ck.name.startswith("step-"):
            assert {"state.json", "trainable.safetensors", "optimizer.pt"} <= {p.name for p in ck.iterdir()}, ck

    # Simulate what a crash in the middle of a checkpoint write could leave behind (atomic_dir writes into a
    # hidden .tmp sibling and renames; a dir without state.json is what a non-atomic writer would leave):
    good = latest_checkpoint(run_dir)
    shutil.copytree(good, ck_dir / f".step-{HEAD_STEPS + 1}.tmp-deadbeef")  # complete-looking, but a temp dir
    (ck_dir / f".step-{HEAD_STEPS + 2}.tmp-cafe").mkdir()  # an empty temp dir
    half = ck_dir / f"step-{HEAD_STEPS + 3}"  # a higher step, with weights but no state.json
    half.mkdir()
    shutil.copy(good / "trainable.safetensors", half / "trainable.safetensors")
    (half / "optimizer.pt").write_bytes(b"\x80truncated")
    assert latest_checkpoint(run_dir) == good

    resumed = _run(_head_argv(tiny_pairs_file, cache_dir, run_dir, *steps, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed {run_dir} at step {killed_at}" in resumed.stderr
    m_res = json.loads((run_dir / "result.json").read_text())["metrics"]
    for k in ("steps", "best_step", "dev_accuracy", "dev_loss", "train_loss", "train_accuracy"):
        assert m_res[k] == m_full[k], k
    # Bit-for-bit: the saved heads and the final checkpoints (weights + best-on-dev weights).
    _assert_same_tensors(load_file(str(tmp_path / "full" / "head" / "head.safetensors")),
                         load_file(str(run_dir / "head" / "head.safetensors")))
    _assert_same_tensors(load_file(str(latest_checkpoint(tmp_path / "full") / "trainable.safetensors")),
                         load_file(str(latest_checkpoint(run_dir) / "trainable.safetensors")))
    assert _step(latest_checkpoint(run_dir)) == HEAD_STEPS
    # The training log reads like one run: steps logged after the last checkpoint by the killed process are
    # dropped on resume, not repeated, and the per-step losses are the uninterrupted run's.
    def log_rows(d):
        return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if '"step"' in x]

    rows, rows_full = log_rows(run_dir), log_rows(tmp_path / "full")
    assert [r["step"] for r in rows] == list(range(1, HEAD_STEPS + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in rows_full]
    load_head(run_dir / "head", expected_backbone=backbone.fingerprint)


# --------------------------------------------------------------------------------------------------
# 4: NaN loss through the CLI
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def cli_backbone(backbone, monkeypatch):
    """In-process CLI runs reuse the session's backbone instead of loading another copy (~6 s each)."""
    import arbiter.backbone

    monkeypatch.setattr(arbiter.backbone, "load_backbone", lambda *a, **k: backbone)
    return backbone


def _cli_args(data, cache_dir, out, *extra) -> list[str]:
    return _head_argv(data, cache_dir, out, *extra)[5:]  # after `python -m arbiter.cli train head`


def test_nan_loss_through_the_cli_exits_1_and_keeps_last_good_checkpoint(tiny_pairs_file, cache_dir, cli_backbone,
                                                                         tmp_path, monkeypatch, capsys):
    import dataclasses

    from arbiter.training import batch, cli
    from arbiter.training.checkpoint import latest_checkpoint

    real = batch.LOSSES["dph_contrastive"]
    calls = {"n": 0}

    def poisoned(b, *, eps):
        out = real(b, eps=eps)
        calls["n"] += 1
        if calls["n"] == 6:  # the 6th loss call: step 5 (steps 1-3, the epoch-1 dev eval, steps 4-5)
            return dataclasses.replace(out, losses=out.losses * float("inf") * 0)
        return out

    monkeypatch.setitem(batch.LOSSES, "dph_contrastive", poisoned)
    with pytest.raises(SystemExit) as e:
        cli.main(["head", *_cli_args(tiny_pairs_file, cache_dir, tmp_path / "run", "checkpoint_every=2",
                                     "max_steps=20")])
    err = capsys.readouterr().err
    assert e.value.code == 1, err
    assert "non-finite loss (nan)" in err and "at optimiser step 5: stopped before the update" in err, err
    assert f"Last good checkpoint: {tmp_path / 'run' / 'checkpoints' / 'step-4'}" in err, err
    assert "lower lr" in err and "Traceback" not in err
    assert latest_checkpoint(tmp_path / "run").name == "step-4"
    assert not (tmp_path / "run" / "head").exists() and not (tmp_path / "run" / "result.json").exists()
    # The kept checkpoint is a good one: finite weights, and a resume (no more NaN) finishes the run.
    ck = load_file(str(latest_checkpoint(tmp_path / "run") / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in ck.values())
    monkeypatch.setitem(batch.LOSSES, "dph_contrastive", real)
    assert cli.main(["head", *_cli_args(tiny_pairs_file, cache_dir, tmp_path / "run", "checkpoint_every=2",
                                        "max_steps=20"), "--resume"]) == 0
    assert json.loads((tmp_path / "run" / "result.json").read_text())["metrics"]["steps"] == 20


# --------------------------------------------------------------------------------------------------
# 5: bad data rows through the CLI
# --------------------------------------------------------------------------------------------------

BAD_ROWS = [
    '{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}]',  # cut
    "not json at all",
    json.dumps({"prompt": "a question", "chosen": "an answer"}),  # no rejected
    json.dumps({"prompt": "same?", "chosen": "yes", "rejected": "yes"}),  # identical answers
    json.dumps({"prompt": "empty?", "chosen": "", "rejected": "something"}),  # empty answer
]


def test_bad_rows_are_counted_with_examples_and_the_run_continues(tiny_pairs_file, cache_dir, cli_backbone,
                                                                  tmp_path, capsys):
    from arbiter.heads import read_config
    from arbiter.training import cli

    good = Path(tiny_pairs_file).read_text().splitlines()
    mixed = tmp_path / "mixed.jsonl"
    # Bad rows spread between the good ones; the usable pairs (and so their features) are those of the tiny set.
    lines = []
    for i, line in enumerate(good):
        lines.append(line)
        if i % 3 == 0 and i // 3 < len(BAD_ROWS):
            lines.append(BAD_ROWS[i // 3])
    mixed.write_text("\n".join(lines) + "\n")
    assert cli.main(["head", *_cli_args(mixed, cache_dir, tmp_path / "run", "max_steps=3")]) == 0
    capsys.readouterr()
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    report = result["report"]
    assert result["metrics"]["feature_cache"] == "hit"  # the bad rows changed nothing about the usable pairs
    assert report["kept"] == N_PAIRS and report["total"] == N_PAIRS + len(BAD_ROWS)
    assert sum(report["dropped"].values()) == len(BAD_ROWS), report
    assert report["dropped"].get("unparseable") == 2 and report["dropped"].get("identical") == 1
    assert report["dropped"].get("empty_answer") == 1, report
    for reason, n in report["dropped"].items():  # every reason comes with examples that name the row
        assert 1 <= len(report["examples"][reason]) <= n, (reason, report["examples"])
        assert all("row" in ex for ex in report["examples"][reason])
    assert any("not json at all" in ex for ex in report["examples"]["unparseable"])
    prov = read_config(tmp_path / "run" / "head").provenance["report"]
    assert prov["kept"] == N_PAIRS and prov["dropped"] == report["dropped"]


def test_zero_usable_rows_exit_2_with_per_reason_counts(cache_dir, cli_backbone, tmp_path, capsys):
    from arbiter.training import cli

    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(BAD_ROWS + BAD_ROWS[1:2]) + "\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["head", *_cli_args(bad, cache_dir, tmp_path / "run", "max_steps=3")])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "zero usable rows out of 6" in err, err
    for reason, n in (("unparseable", 3), ("identical", 1), ("empty_answer", 1)):
        assert f"{reason}: {n}" in err, (reason, err)
    assert "not json at all" in err  # an example of the worst reason, so the user can find the row
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "head").exists()


def test_truncated_reference_parquet_is_a_clear_data_error(tmp_path, capsys):
    """A corrupted ref parquet (``arbiter train ref`` output) is refused with exit 2, never half-read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from arbiter.training import cli
    from arbiter.training.data import DataError, load_pairs

    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": [{"role": "assistant", "content": "good"}],
             "rejected": [{"role": "assistant", "content": "bad"}], "ref_chosen_logp": -1.0 * i,
             "ref_rejected_logp": -2.0 * i} for i in range(8)]
    path = tmp_path / "ref.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert len(load_pairs(str(path))[0]) == 8
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a torn copy / partial download
    with pytest.raises(DataError, match="cannot read parquet"):
        load_pairs(str(path))
    with pytest.raises(SystemExit) as e:  # the adapter recipe reads it before loading any model
        cli.main(["adapter", f"data.source={path}", "loss=dpo", f"out={tmp_path / 'run'}", "progress=false"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "cannot read parquet" in err, err


# --------------------------------------------------------------------------------------------------
# 1 (adapter): kill -9 mid-run, resume == uninterrupted, with real forward/backward passes of the model
# --------------------------------------------------------------------------------------------------

ADAPTER_LEN = 64


@pytest.mark.slow
def test_adapter_kill9_then_resume_equals_uninterrupted(backbone, tmp_path):
    from arbiter.training.checkpoint import latest_checkpoint
    from arbiter.training.data import load_pairs, save_pairs, tokenize_pairs

    # The 4 shortest real hh-rlhf pairs (as test_adapter_recipe.py): a step is a few seconds on this CPU.
    pairs, _ = load_pairs("hh-rlhf", seed=0)
    chars = lambda p: sum(len(m["content"]) for m in p.prompt) + len(p.chosen) + len(p.rejected)  # noqa: E731
    pairs = sorted(pairs, key=chars)[:200]
    tokenized, _ = tokenize_pairs(pairs, backbone.tokenizer, backbone.end_id, max_length=ADAPTER_LEN)
    size = lambda tp: len(tp.prompt_ids) + len(tp.chosen_ids) + len(tp.rejected_ids)  # noqa: E731
    chosen = {(tp.meta["source"], tp.meta["row"]) for tp in sorted(tokenized, key=size)[:4]}
    data = save_pairs([p for p in pairs if (p.meta["source"], p.meta["row"]) in chosen], tmp_path / "tiny.jsonl")

    def argv(out, *extra):
        # LoRA dropout: the restored RNG matters; the adapter-disabled model is the reference.
        return [sys.executable, "-m", "arbiter.cli", "train", "adapter", "--out", str(out), f"data.source={data}",
                f"data.max_length={ADAPTER_LEN}", "loss=dpo", "reference=adapter_disabled", "lora.r=4",
                "lora.alpha=8", "lora.dropout=0.1", "optim.batch_size=2", "optim.lr=1e-3", "optim.schedule=constant",
                "optim.warmup_steps=0", "optim.max_steps=4", "save_every=1", "keep_checkpoints=5", "progress=false",
                *extra]

    full = _run(argv(tmp_path / "full"), timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]
    killed_at = _kill_after_first_checkpoint(argv(tmp_path / "killed"), tmp_path / "killed", timeout=240)
    assert 0 < killed_at < 4, killed_at
    assert not (tmp_path / "killed" / "adapter").exists()  # nothing a loader could take for a finished adapter
    resumed = _run(argv(tmp_path / "killed", "--resume"), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_tensors(load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors")),
                         load_file(str(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")))
    _assert_same_tensors(load_file(str(latest_checkpoint(tmp_path / "full") / "trainable.safetensors")),
                         load_file(str(latest_checkpoint(tmp_path / "killed") / "trainable.safetensors")))
    hist = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [1, 2, 3, 4]
    assert [h["loss"] for h in hist] == [h["loss"] for h in ref]


def test_resume_truncates_the_log_to_the_checkpoint(tmp_path):
    """Lines a killed run wrote after its checkpoint, a torn last line and a finished run's closing summary go;
    the steps up to the checkpoint stay, in order."""
    from arbiter.training.artifacts import truncate_metrics

    log = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)] + [json.dumps({"final": {"steps": 5}}),
                                                                                '{"step": 6, "lo']
    log.write_text("\n".join(lines) + "\n")
    truncate_metrics(log, 3)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3]
