"""Head storage: ``<dir>/head_config.json`` + ``<dir>/head.safetensors``, nothing else.

Heads are data, never code: no pickle is ever read. Loading is strict (format version, backbone
fingerprint, exact tensor names and shapes, finite values) and every refusal is a ``HeadLoadError`` whose
message names the problem. Saving writes a temporary sibling directory and renames it into place, so a
crash never leaves a half-written head where a loader would find it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from arbiter.fsutil import atomic_dir, read_json_object

from .config import BackboneFingerprint, HeadConfig
from .modules import DPHHead

CONFIG_FILE = "head_config.json"
WEIGHTS_FILE = "head.safetensors"
_ALLOWED = {CONFIG_FILE, WEIGHTS_FILE}
MAX_CONFIG_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 1 << 31


class HeadLoadError(ValueError):
    """A head directory that cannot be loaded; the message says why."""


def save_head(head: DPHHead, config: HeadConfig, directory: str | os.PathLike[str]) -> Path:
    """Write the head atomically (``arbiter.fsutil.atomic_dir``: temp dir beside the target, fsync, rename over it)."""
    target = Path(directory)
    with atomic_dir(target) as tmp:
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "arbiter_head": str(config.format_version)})
        (tmp / CONFIG_FILE).write_text(config.model_dump_json(indent=2) + "\n")
    return target


def read_config(directory: str | os.PathLike[str]) -> HeadConfig:
    d = Path(directory)
    _check_dir(d)
    path = d / CONFIG_FILE
    raw = read_json_object(path, MAX_CONFIG_BYTES, HeadLoadError)
    version = raw.get("format_version")
    if version != HeadConfig.model_fields["format_version"].default:
        raise HeadLoadError(
            f"{path}: unknown head format_version {version!r}; this Arbiter reads "
            f"version {HeadConfig.model_fields['format_version'].default}"
        )
    try:
        return HeadConfig.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())) or "config"
        raise HeadLoadError(f"{path}: invalid head config at {where}: {first.get('msg')}") from None


def _check_dir(d: Path) -> None:
    if d.is_symlink():
        raise HeadLoadError(f"{d}: head directory is a symlink; refusing to follow it")
    if not d.is_dir():
        raise HeadLoadError(f"{d}: no such head directory")
    names = {p.name for p in d.iterdir()}
    missing = _ALLOWED - names
    if missing:
        raise HeadLoadError(f"{d}: missing {', '.join(sorted(missing))} (a head is {CONFIG_FILE} + {WEIGHTS_FILE})")
    extra = sorted(n for n in names - _ALLOWED if not n.startswith("."))
    if extra:
        raise HeadLoadError(
            f"{d}: unexpected files {extra}; a head is only {CONFIG_FILE} + {WEIGHTS_FILE} "
            "(pickled weights are never loaded)"
        )
    for f in _ALLOWED:
        p = d / f
        if p.is_symlink() or not p.is_file():
            raise HeadLoadError(f"{p}: must be a regular file, not a symlink")


def load_head(
    directory: str | os.PathLike[str],
    *,
    expected_backbone: BackboneFingerprint | None = None,
    device: str | torch.device = "cpu",
) -> tuple[DPHHead, HeadConfig]:
    """Load and fully validate a head; returns the module in eval mode and its config."""
    d = Path(directory)
    config = read_config(d)
    if expected_backbone is not None:
        bad = config.backbone.mismatches(expected_backbone)
        if bad:
            raise HeadLoadError(f"{d}: head {config.name!r} was trained on another backbone: " + "; ".join(bad))
    wpath = d / WEIGHTS_FILE
    if wpath.stat().st_size > MAX_WEIGHTS_BYTES:
        raise HeadLoadError(f"{wpath}: weights file too large")
    try:
        state = load_file(str(wpath), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        with open(wpath, "rb") as fh:
            magic = fh.read(4)
        if magic.startswith(b"PK\x03\x04") or (magic[:1] == b"\x80" and magic[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
            raise HeadLoadError(f"{wpath}: looks like a pickle/torch.save file; only safetensors is accepted") from None
        raise HeadLoadError(f"{wpath}: not a valid safetensors file ({e})") from None
    head = DPHHead(config)
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if set(got) != set(expected):
        missing = sorted(set(expected) - set(got))
        unexpected = sorted(set(got) - set(expected))
        raise HeadLoadError(
            f"{wpath}: tensors do not match pooler {config.pooler!r}: missing {missing}, unexpected {unexpected}"
        )
    for k, shape in expected.items():
        if got[k] != shape:
            raise HeadLoadError(f"{wpath}: tensor {k!r} has shape {list(got[k])}, expected {list(shape)}")
        t = state[k]
        if not t.is_floating_point():
            raise HeadLoadError(f"{wpath}: tensor {k!r} has dtype {t.dtype}, expected a float type")
        if not torch.isfinite(t).all():
            raise HeadLoadError(f"{wpath}: tensor {k!r} contains NaN or Inf")
    head.load_state_dict({k: v.float() for k, v in state.items()})
    head.eval().requires_grad_(False)
    return head.to(device), config
