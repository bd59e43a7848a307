"""SAELens on-disk layout: hook names <-> layers, save_sae / load_sae (never a pickle; every shape checked), digest."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from arbiter.fsutil import atomic_dir, read_json_object

from .model import _PICKLE_SUFFIXES, CFG_FILE, MAX_CFG_BYTES, WEIGHTS_FILE, Activation, SAELoadError, SparseAutoencoder

log = logging.getLogger("arbiter.training.sae")


# --------------------------------------------------------------------------------------------------------------
# Storage: SAELens layout


def hook_name_for_layer(layer: int) -> str:
    """SAELens/TransformerLens name of block ``layer``'s raw output."""
    return f"blocks.{layer}.hook_resid_post"


_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_(post|pre)$")


def layer_from_hook_name(hook_name: str | None) -> int | None:
    """Block index whose raw output the hook reads: ``resid_post`` of l -> l, ``resid_pre`` of l -> l - 1.

    Returns None for any other hook (attention/MLP outputs): those are not what Arbiter captures.
    """
    if not hook_name:
        return None
    m = _HOOK_RE.match(hook_name)
    if not m:
        return None
    n = int(m.group(1))
    if m.group(2) == "post":
        return n
    return n - 1 if n >= 1 else None  # resid_pre of block 0 is the embedding output, not a block output


def save_sae(sae: SparseAutoencoder, directory: str | os.PathLike, cfg_dict: dict | None = None) -> Path:
    """Write ``<dir>/cfg.json`` + ``<dir>/sae_weights.safetensors`` atomically, in SAELens' layout.

    ``cfg_dict`` adds descriptive keys (``model_name``, ``hook_layer`` or ``hook_name``, ``context_size``,
    ``dataset_path``, training metrics under ``"arbiter"`` ...). Keys that describe the weights (d_in, d_sae,
    architecture, k, ...) come from the SAE itself; a cfg_dict that contradicts them is refused.
    The file carries the descriptive keys both at the top level (SAELens < 6) and under ``metadata``
    (SAELens >= 6), so either version's ``SAE.load_from_disk`` reads it.
    """
    extra = dict(cfg_dict or {})
    base = sae.config_dict()
    for key, val in base.items():
        if key in extra and extra[key] != val and key not in ("device",):
            raise ValueError(f"save_sae: cfg_dict[{key!r}] = {extra[key]!r} contradicts the SAE ({val!r})")
    layer = extra.pop("hook_layer", sae.hook_layer)
    hook_name = extra.pop("hook_name", None) or sae.hook_name or (hook_name_for_layer(layer) if layer is not None else None)
    if layer is None:
        layer = layer_from_hook_name(hook_name)
    if hook_name is None:
        raise ValueError("save_sae needs the layer: set sae.hook_layer or pass cfg_dict={'hook_layer': l}")
    m = _HOOK_RE.match(hook_name)
    if m:  # SAELens's hook_layer is the block in the hook's name (resid_pre of block l + 1 reads layer l)
        layer = int(m.group(1))
    model_name = extra.pop("model_name", sae.model_name)
    meta_keys = ("context_size", "dataset_path", "prepend_bos", "hook_head_index", "model_class_name",
                 "exclude_special_tokens")
    cfg = {**base, **extra, "model_name": model_name, "hook_name": hook_name, "hook_layer": layer}
    cfg.setdefault("hook_head_index", None)
    cfg["metadata"] = {
        "model_name": model_name,
        "hook_name": hook_name,
        **{k: cfg[k] for k in meta_keys if k in cfg},
        **(extra.get("metadata") or {}),
    }
    params: dict[str, Tensor] = {
        "W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec,
        **({"threshold": sae.threshold} if sae.threshold is not None else {}),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in params.items()}
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"save_sae: tensor {name} has non-finite values; refusing to write it")
    with atomic_dir(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    return Path(directory)


def resolve_sae_dir(directory: str | os.PathLike) -> Path:
    """The SAE directory itself, or the ``sae/`` inside an ``arbiter train sae`` run directory."""
    d = Path(directory)
    if not (d / CFG_FILE).is_file() and (d / "sae" / CFG_FILE).is_file():
        return d / "sae"
    return d


def read_sae_config(directory: str | os.PathLike) -> dict:
    """``cfg.json`` of an SAE directory as a dict (no weights read)."""
    d = resolve_sae_dir(directory)
    if not d.is_dir():
        raise SAELoadError(f"SAE directory {d} does not exist")
    path = d / CFG_FILE
    if not path.is_file():
        raise SAELoadError(f"{d} has no {CFG_FILE}: an SAE directory holds cfg.json + {WEIGHTS_FILE} (SAELens layout)")
    return read_json_object(path, MAX_CFG_BYTES, SAELoadError, "SAE config")


def _cfg_get(cfg: dict, key: str, default: Any = None) -> Any:
    """A key from the top level (SAELens < 6) or from ``metadata`` (SAELens >= 6)."""
    if cfg.get(key) is not None:
        return cfg[key]
    meta = cfg.get("metadata")
    if isinstance(meta, dict) and meta.get(key) is not None:
        return meta[key]
    return default


def _positive_int(cfg: dict, key: str, path: Path) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise SAELoadError(f"{path}: {key} must be a positive integer, got {v!r}")
    return v


def load_sae(
    directory: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    expect_d_in: int | None = None,
) -> SparseAutoencoder:
    """Load an SAE in SAELens' layout (ours, or one written by SAELens 5.x / 6.x), refusing anything else.

    ``directory`` may also be an ``arbiter train sae`` run directory (its ``sae/`` is used).
    Reads ``cfg.json`` (d_in, d_sae, architecture, k / activation_fn_kwargs, apply_b_dec_to_input,
    hook_name / hook_layer, model_name; extra keys are ignored) and ``sae_weights.safetensors``
    (W_enc, b_enc, W_dec, b_dec, and threshold or log_threshold for JumpReLU). Never unpickles anything.
    ``expect_d_in``: the backbone's hidden size; a mismatch is a clear error.
    """
    d = resolve_sae_dir(directory)
    cfg = read_sae_config(d)
    cfg_path = d / CFG_FILE
    wpath = d / WEIGHTS_FILE
    if not wpath.is_file():
        pickles = sorted(p.name for p in d.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
        if pickles:
            raise SAELoadError(
                f"{d} has no {WEIGHTS_FILE} but has {pickles}: pickled / numpy weights are never loaded "
                "(they can run code); convert them to safetensors with the SAELens tensor names "
                "W_enc, b_enc, W_dec, b_dec[, threshold]"
            )
        raise SAELoadError(f"{d} has no {WEIGHTS_FILE}")

    d_in = _positive_int(cfg, "d_in", cfg_path)
    d_sae = _positive_int(cfg, "d_sae", cfg_path)
    arch = str(cfg.get("architecture") or "standard").lower()
    act_fn = str(cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu").lower()
    if arch == "topk" or (arch == "standard" and act_fn == "topk"):
        activation: Activation = "topk"
        k = cfg.get("k")
        if k is None and isinstance(cfg.get("activation_fn_kwargs"), dict):
            k = cfg["activation_fn_kwargs"].get("k")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_sae:
            raise SAELoadError(f"{cfg_path}: a top-k SAE needs an integer k in [1, d_sae={d_sae}], got {k!r}")
    elif arch == "jumprelu":
        activation, k = "jumprelu", None
    elif arch == "standard":
        if act_fn != "relu":
            raise SAELoadError(f"{cfg_path}: activation_fn {act_fn!r} is not supported (relu, topk)")
        activation, k = "relu", None
    else:
        raise SAELoadError(
            f"{cfg_path}: architecture {arch!r} is not supported; Arbiter loads 'topk', 'jumprelu' and "
            "'standard' (ReLU) SAEs (SAELens saves BatchTopK SAEs as 'jumprelu' for inference)"
        )
    norm = cfg.get("normalize_activations")
    if norm not in (None, False, "none"):
        raise SAELoadError(
            f"{cfg_path}: normalize_activations={norm!r} is not supported: fold the scaling into the weights "
            "first (SAELens: sae.fold_activation_norm_scaling_factor) and save with normalize_activations='none'"
        )
    if cfg.get("reshape_activations") not in (None, "none"):
        raise SAELoadError(f"{cfg_path}: reshape_activations={cfg['reshape_activations']!r}: Arbiter feeds residual-stream SAEs only")
    if cfg.get("finetuning_scaling_factor") is True:
        raise SAELoadError(f"{cfg_path}: finetuning_scaling_factor SAEs are not supported")
    rescale = bool(cfg.get("rescale_acts_by_decoder_norm", False)) if activation == "topk" else False

    try:
        with safe_open(str(wpath), framework="pt", device="cpu") as f:
            names = set(f.keys())
        state = load_file(str(wpath), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise SAELoadError(f"{wpath}: not a readable safetensors file ({e})") from None
    if "log_threshold" in state and "threshold" not in state:
        # Older SAELens JumpReLU training checkpoints stored log(threshold) (SAELens converts the same way).
        state["threshold"] = torch.exp(state.pop("log_threshold"))
    if "scaling_factor" in state:
        sf = state.pop("scaling_factor")
        if not torch.allclose(sf, torch.ones_like(sf)):
            raise SAELoadError(f"{wpath}: a scaling_factor other than 1 is not supported")
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if activation == "jumprelu":
        expected["threshold"] = (d_sae,)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise SAELoadError(f"{wpath}: missing tensor(s) {missing} for a {activation} SAE (has {sorted(names)})")
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise SAELoadError(f"{wpath}: unexpected tensor(s) {unknown} for a {activation} SAE; expected {sorted(expected)}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise SAELoadError(
                f"{wpath}: {name} has shape {tuple(state[name].shape)}, expected {shape} "
                f"(cfg.json: d_in={d_in}, d_sae={d_sae})"
            )
        if not state[name].is_floating_point():
            raise SAELoadError(f"{wpath}: {name} has dtype {state[name].dtype}, expected floating point")
        if not torch.isfinite(state[name]).all():
            raise SAELoadError(f"{wpath}: {name} has non-finite values")
    if expect_d_in is not None and d_in != expect_d_in:
        raise SAELoadError(f"{d}: SAE d_in={d_in} does not match the backbone's hidden size {expect_d_in}")

    hook_name = _cfg_get(cfg, "hook_name") or _cfg_get(cfg, "hook_point")
    # SAELens's hook_layer is the block in the hook's name (blocks.8.hook_resid_pre has hook_layer 8); Arbiter's
    # layer is the block whose raw output is read (resid_pre of block 8 = the output of block 7).
    block = cfg.get("hook_layer")
    m = _HOOK_RE.match(hook_name) if hook_name else None
    if isinstance(block, bool) or not isinstance(block, int):
        layer = layer_from_hook_name(hook_name)
    elif m:
        if int(m.group(1)) != block:
            raise SAELoadError(f"{cfg_path}: hook_layer={block} contradicts hook_name={hook_name!r}")
        layer = layer_from_hook_name(hook_name)
    elif hook_name:
        layer = None  # not a residual-stream hook: warned about below
    else:
        layer = block  # no hook name: the block's output (resid_post)
    if layer is None:
        log.warning("%s: hook %r is not a residual-stream hook (blocks.N.hook_resid_post); pass the layer explicitly", d, hook_name)
    sae = SparseAutoencoder(
        d_in, d_sae, activation=activation, k=k,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        rescale_acts_by_decoder_norm=rescale, hook_layer=layer, hook_name=hook_name,
        model_name=_cfg_get(cfg, "model_name"), dtype=dtype,
    )
    with torch.no_grad():
        for name in expected:
            getattr(sae, name).copy_(state[name].to(dtype))
    return sae.to(device)


def sae_digest(sae: SparseAutoencoder) -> str:
    """sha256 over the SAE's structure and weights (identifies it in cache keys)."""
    h = hashlib.sha256(json.dumps(sae.config_dict(), sort_keys=True).encode())
    for name, t in sorted(sae.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
