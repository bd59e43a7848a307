"""Head storage: ``<dir>/head_config.json`` + ``<dir>/head.safetensors``, and a ``README.md`` model card that is
written beside them (``heads/card.py``) and never read by the loader.

Heads are data, never code: no pickle is ever read. Loading is strict (format version, backbone
fingerprint, exact tensor names and shapes, finite values) and every refusal is a ``HeadLoadError`` whose
message names the problem. Saving writes a temporary sibling directory and renames it into place, so a
crash never leaves a half-written head where a loader would find it.
"""

from __future__ import annotations

import json
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
_IGNORED = {"README.md"}  # the model card (heads/card.py): allowed beside the head, never read
MAX_CONFIG_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 1 << 31
MAX_HEADER_BYTES = 1 << 20  # a head's safetensors header names a handful of tensors
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class HeadLoadError(ValueError):
    """A head directory that cannot be loaded; the message says why."""


def save_head(head: DPHHead, config: HeadConfig, directory: str | os.PathLike[str], *, card: bool = True) -> Path:
    """Write the head atomically (``arbiter.fsutil.atomic_dir``: temp dir beside the target, fsync, rename over it),
    with its model card (``README.md``, ``heads/card.py``) unless ``card`` is false."""
    from .card import CARD_FILE, render_card

    target = Path(directory)
    with atomic_dir(target) as tmp:
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "arbiter_head": str(config.format_version)})
        (tmp / CONFIG_FILE).write_text(config.model_dump_json(indent=2) + "\n")
        if card:
            (tmp / CARD_FILE).write_text(render_card(config, target))
    return target


def read_config(directory: str | os.PathLike[str], *, shown: str | None = None) -> HeadConfig:
    """The validated config of a head directory; ``shown`` is how messages name the directory (the server passes
    the path relative to its heads directory, so no error body reveals the server's layout)."""
    d = Path(directory)
    s = Path(shown) if shown is not None else d
    _check_dir(d, s)
    path = s / CONFIG_FILE
    raw = read_json_object(d / CONFIG_FILE, MAX_CONFIG_BYTES, HeadLoadError, shown=path)
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


def _check_dir(d: Path, s: Path) -> None:
    if d.is_symlink():
        raise HeadLoadError(f"{s}: head directory is a symlink; refusing to follow it")
    if not d.is_dir():
        raise HeadLoadError(f"{s}: no such head directory")
    names = {p.name for p in d.iterdir()}
    missing = _ALLOWED - names
    if missing:
        raise HeadLoadError(f"{s}: missing {', '.join(sorted(missing))} (a head is {CONFIG_FILE} + {WEIGHTS_FILE})")
    extra = sorted(n for n in names - _ALLOWED - _IGNORED if not n.startswith("."))
    if extra:
        raise HeadLoadError(
            f"{s}: unexpected files {extra}; a head is only {CONFIG_FILE} + {WEIGHTS_FILE} (and its README.md card) "
            "(pickled weights are never loaded)"
        )
    for f in sorted(_ALLOWED):
        p = d / f
        if p.is_symlink() or not p.is_file():
            raise HeadLoadError(f"{s / f}: must be a regular file, not a symlink")


def _header_shapes(path: Path, shown: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) from a safetensors file's header (8-byte little-endian length + JSON; the
    format of huggingface/safetensors), read before any tensor is: shapes are checked before anything is
    allocated. Offsets must lie inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise HeadLoadError(f"{shown}: not a valid safetensors file (header length {n})")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise HeadLoadError(f"{shown}: not a valid safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise HeadLoadError(f"{shown}: not a valid safetensors file (its header is not an object)")
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = info["dtype"], tuple(int(x) for x in info["shape"]), info["data_offsets"]
            if not (isinstance(dtype, str) and 0 <= int(a) <= int(b) <= size - 8 - n):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise HeadLoadError(f"{shown}: not a valid safetensors file (bad entry for tensor {str(name)[:64]!r})") from None
        out[str(name)] = (dtype, shape)
    return out


def load_head(
    directory: str | os.PathLike[str],
    *,
    expected_backbone: BackboneFingerprint | None = None,
    device: str | torch.device = "cpu",
    shown: str | None = None,
) -> tuple[DPHHead, HeadConfig]:
    """Load and fully validate a head; returns the module in eval mode and its config. ``shown``: how messages
    name the directory (read_config)."""
    d = Path(directory)
    s = Path(shown) if shown is not None else d
    config = read_config(d, shown=shown)
    if expected_backbone is not None:
        bad = config.backbone.mismatches(expected_backbone)
        if bad:
            raise HeadLoadError(f"{s}: head {config.name!r} was trained on another backbone: " + "; ".join(bad))
    wpath, wshown = d / WEIGHTS_FILE, s / WEIGHTS_FILE
    if wpath.stat().st_size > MAX_WEIGHTS_BYTES:
        raise HeadLoadError(f"{wshown}: weights file larger than {MAX_WEIGHTS_BYTES} bytes")
    with open(wpath, "rb") as fh:
        magic = fh.read(4)
    if magic.startswith(b"PK\x03\x04") or (magic[:1] == b"\x80" and magic[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        raise HeadLoadError(f"{wshown}: looks like a pickle/torch.save file; only safetensors is accepted")
    # Names, shapes and dtypes from the header and the config, before a tensor or a module is allocated.
    expected = config.tensor_shapes()
    got = _header_shapes(wpath, wshown)
    if set(got) != set(expected):
        missing = sorted(set(expected) - set(got))
        unexpected = sorted(set(got) - set(expected))[:8]
        raise HeadLoadError(
            f"{wshown}: tensors do not match pooler {config.pooler!r}: missing {missing}, unexpected {unexpected}"
        )
    for k, shape in expected.items():
        dtype, gshape = got[k]
        if gshape != shape:
            raise HeadLoadError(f"{wshown}: tensor {k!r} has shape {list(gshape)}, expected {list(shape)}")
        if dtype not in FLOAT_DTYPES:
            raise HeadLoadError(f"{wshown}: tensor {k!r} has dtype {dtype}, expected a float type")
    try:
        state = load_file(str(wpath), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise HeadLoadError(f"{wshown}: not a valid safetensors file ({type(e).__name__})") from None
    for k in expected:
        if not torch.isfinite(state[k]).all():
            raise HeadLoadError(f"{wshown}: tensor {k!r} contains NaN or Inf")
    head = DPHHead(config)
    head.load_state_dict({k: v.float() for k, v in state.items()})
    head.eval().requires_grad_(False)
    return head.to(device), config
