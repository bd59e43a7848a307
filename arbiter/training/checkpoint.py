"""Checkpoints that make ``--resume`` continue exactly.

A checkpoint is a directory ``<run>/checkpoints/step-<N>/`` written atomically, holding:
  - ``trainable.safetensors``: the trainable tensors (LoRA weights, head weights, SAE weights, ...)
  - ``optimizer.pt``: the optimizer/scheduler state. torch's own format, read with ``weights_only=True``
    (no arbitrary pickle), and only from checkpoints this run wrote itself.
  - ``state.json``: step, epoch, position in the data order, metrics so far, RNG states, the config.
Resuming restores all of it, so a resumed run and an uninterrupted run end with the same weights.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from arbiter.fsutil import atomic_dir

_STEP_RE = re.compile(r"^step-(\d+)$")


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain lists, so ``torch.load(weights_only=True)`` can read them."""
    py = random.getstate()
    npst: Any = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [npst[0], torch.from_numpy(np.asarray(npst[1], dtype=np.int64)), npst[2], npst[3], npst[4]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Checkpoint:
    step: int
    tensors: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    tensors: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    *,
    keep: int = 2,
) -> Path:
    root = Path(run_dir) / "checkpoints"
    target = root / f"step-{step}"
    with atomic_dir(target) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer_state, "rng": rng_state()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2, default=str))
    # Old checkpoints go only after the new one is complete.
    steps = sorted(_list_steps(root))
    for s in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(root / f"step-{s}", ignore_errors=True)
    return target


def _list_steps(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and (p / "state.json").is_file() and (p / "trainable.safetensors").is_file():
            out.append(int(m.group(1)))
    return out


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    steps = _list_steps(Path(run_dir) / "checkpoints")
    return Path(run_dir) / "checkpoints" / f"step-{max(steps)}" if steps else None


def load_checkpoint(path: str | Path, *, restore_rng: bool = True) -> Checkpoint:
    path = Path(path)
    tensors = load_file(str(path / "trainable.safetensors"))
    blob = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    state = json.loads((path / "state.json").read_text())
    if restore_rng:
        set_rng_state(blob["rng"])
    return Checkpoint(step=int(state["step"]), tensors=tensors, optimizer=blob["optimizer"], state=state)
