"""``report_to``: a short head run and a short adapter run log to TensorBoard and to an offline W&B run, and what
those hold, read back with each tool's own reader (TensorBoard's EventAccumulator, W&B's run-file DataStore), is
what ``metrics.jsonl`` holds, step for step."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch, tmp_path):
    for k in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))


def jsonl_steps(run_dir: Path) -> dict[int, dict[str, float]]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "step" in rec:
            out[rec["step"]] = {k: float(v) for k, v in rec.items() if k != "step" and isinstance(v, (int, float))
                                and not isinstance(v, bool) and math.isfinite(v)}
    return out


def tensorboard_steps(run_dir: Path) -> dict[int, dict[str, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    out: dict[int, dict[str, float]] = {}
    for tag in ea.Tags()["scalars"]:
        for ev in ea.Scalars(tag):
            out.setdefault(ev.step, {})[tag] = ev.value
    return out


def wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B run file, read by its documented framing (LevelDB's log format behind a 7-byte
    ``:W&B`` header): 32 KiB blocks of chunks [crc32 4 | length 2 | type 1 | data], types FULL 1, FIRST 2,
    MIDDLE 3, LAST 4; a block's tail shorter than a chunk header is padding. Each chunk's CRC is checked."""
    import struct
    import zlib

    raw = path.read_bytes()
    assert raw[:4] == b":W&B" and raw[4:6] == bytes([0xE1, 0xBE]) and raw[6] == 0, raw[:7]
    out, part, pos = [], b"", 7
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        crc, n, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data = raw[pos + 7 : pos + 7 + n]
        if kind == 0 and n == 0:  # zero padding
            pos += left
            continue
        assert crc == zlib.crc32(data, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF, f"bad CRC at {pos}"
        part = data if kind in (1, 2) else part + data
        if kind in (1, 4):
            out.append(part)
        pos += 7 + n
    return out


def wandb_steps(run_dir: Path) -> tuple[dict[int, dict[str, float]], dict]:
    """(history by step, summary) from the offline run's ``.wandb`` file, each record parsed with W&B's own
    protobuf message (``wandb_internal_pb2.Record``)."""
    from wandb.proto import wandb_internal_pb2

    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    hist: dict[int, dict[str, float]] = {}
    summary: dict = {}
    for data in wandb_records(files[0]):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            step = int(rec.history.step.num) if rec.history.HasField("step") else int(items["_step"])
            hist[step] = {k: float(v) for k, v in items.items() if not k.startswith("_")}
        elif kind == "summary":
            summary.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.summary.update})
    return hist, summary


def assert_same(got: dict[int, dict[str, float]], want: dict[int, dict[str, float]], rel: float) -> None:
    assert sorted(got) == sorted(want) and want
    for step, rec in want.items():
        assert sorted(got[step]) == sorted(rec), step
        for k, v in rec.items():
            assert got[step][k] == pytest.approx(v, rel=rel, abs=1e-12), (step, k)


def test_a_head_run_reports_to_tensorboard_and_wandb_what_metrics_jsonl_holds(tmp_path):
    from arbiter.heads import BackboneFingerprint
    from arbiter.training.head_trainer import HeadTrainSettings, train_on_features

    g = torch.Generator().manual_seed(0)
    fw, fl = torch.randn(40, 16, generator=g) + 0.3, torch.randn(40, 16, generator=g)
    splits = {"train": list(range(32)), "dev": list(range(32, 40)), "test": []}
    fp = BackboneFingerprint(model_name="toy", hidden_size=16, num_layers=2, vocab_hash="0" * 32)
    cfg = HeadTrainSettings(name="toy", epochs=3, batch_size=8, patience=0, progress=False,
                            report_to=["jsonl", "tensorboard", "wandb"])
    res = train_on_features(cfg, fw, fl, splits, fingerprint=fp, ffn_size=None, run_dir=tmp_path / "run")
    want = jsonl_steps(tmp_path / "run")
    assert len(want) == 12 and "loss" in want[1] and "eval_rewards/accuracies" in want[4]  # dev after each epoch
    assert_same(tensorboard_steps(tmp_path / "run"), want, rel=1e-6)  # TensorBoard stores float32
    hist, summary = wandb_steps(tmp_path / "run")
    assert_same(hist, want, rel=1e-12)
    assert summary["dev_accuracy"] == pytest.approx(res.metrics["dev_accuracy"])
    assert (tmp_path / "run" / "wandb_run_id").read_text().strip()


@pytest.mark.parametrize("bad, match", [(["tensorbord"], "is not one of"), ("wandb", None)])
def test_report_to_is_checked(tmp_path, bad, match):
    from arbiter.training.config import ConfigError
    from arbiter.training.trackers import check_report_to

    if match is None:
        assert check_report_to(bad) == ["wandb"]  # one name is a list of one
        return
    with pytest.raises(ConfigError, match=match):
        check_report_to(bad)


def test_an_adapter_run_reports_to_tensorboard_and_wandb_what_metrics_jsonl_holds(tmp_path, backbone):
    from arbiter.training.config import load_config
    from arbiter.training.data import load_pairs, save_pairs, tokenize_pairs
    from arbiter.training.recipes import adapter

    pairs, _ = load_pairs("hh-rlhf", seed=0)
    chars = lambda p: sum(len(m["content"]) for m in p.prompt) + len(p.chosen) + len(p.rejected)  # noqa: E731
    pairs = sorted(pairs, key=chars)[:40]
    tok, _ = tokenize_pairs(pairs, backbone.tokenizer, backbone.end_id, max_length=64)
    keep = {(t.meta["source"], t.meta["row"]) for t in tok[:4]}
    src = save_pairs([p for p in pairs if (p.meta["source"], p.meta["row"]) in keep], tmp_path / "tiny.jsonl")
    cfg = load_config(adapter.CONFIG, None, [
        f"data.source={src}", "data.max_length=64", "data.dev_fraction=0", "lora.r=4", "lora.alpha=8",
        "optim.batch_size=2", "optim.lr=1e-3", "optim.max_steps=3", "optim.warmup_steps=0", "reference=adapter_disabled",
        f"out={tmp_path / 'run'}", "progress=false", "report_to=[jsonl,tensorboard,wandb]"])
    adapter.run(cfg, backbone=backbone)
    want = jsonl_steps(tmp_path / "run")
    assert sorted(want) == [1, 2, 3] and {"loss", "rewards/accuracies", "rewards/margins", "logps/chosen"} <= set(want[1])
    assert_same(tensorboard_steps(tmp_path / "run"), want, rel=1e-6)
    assert_same(wandb_steps(tmp_path / "run")[0], want, rel=1e-12)
