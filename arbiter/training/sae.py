"""Sparse autoencoders (SAEs) on one layer's residual stream, for FPO (docs/methods.md, "Policy losses": `fpo`).

What lives here:
- :class:`SparseAutoencoder`: SAELens-compatible parameters ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
  ``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` and, for JumpReLU, ``threshold [d_sae]``; activations
  ``topk`` (k), ``jumprelu`` and ``relu``, computed exactly as SAELens' inference classes do.
- :func:`save_sae` / :func:`load_sae`: the SAELens on-disk layout (``cfg.json`` + ``sae_weights.safetensors``).
  ``load_sae`` also reads SAEs written by SAELens itself (5.x flat configs and 6.x ``metadata`` configs),
  never reads a pickle, and checks every shape.
- :func:`block_output`: the RAW output of decoder block ``l`` (a forward hook, like
  ``arbiter.backbone.LayerCapture``), which is what SAELens' ``blocks.{l}.hook_resid_post`` means. NOT
  ``hidden_states[num_layers]``: transformers applies the final norm there (docs/methods.md).
- :func:`pool_answer_features` / :func:`pooled_sae_features`: SAE activations of every answer token,
  mean-pooled over the REAL answer tokens of each row (the authors' code divided by the padded length).
- :func:`precompute_ref_features`: the frozen reference model's pooled features for every preference pair,
  cached as safetensors + a sha256 sidecar, so FPO trains with no reference model in memory.
- :func:`train_step` and helpers: one top-k SAE optimisation step (reconstruction MSE + optional AuxK for
  dead latents, unit-norm decoder rows with the parallel gradient component removed), used by
  ``arbiter.training.recipes.sae``.

Top-k SAE training follows Gao et al. 2024, "Scaling and evaluating sparse autoencoders" (arXiv 2406.04093):
tied initialisation W_enc = W_dec^T, b_dec initialised to the data mean, decoder rows kept at unit norm,
AuxK loss on the ``aux_k`` largest pre-activations of dead latents with coefficient 1/32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .artifacts import atomic_dir, atomic_write_text, file_sha256

log = logging.getLogger("arbiter.training.sae")

CFG_FILE = "cfg.json"  # SAELens' SAE_CFG_FILENAME
WEIGHTS_FILE = "sae_weights.safetensors"  # SAELens' SAE_WEIGHTS_FILENAME
SPARSITY_FILE = "sparsity.safetensors"  # SAELens' optional feature log-sparsity file; ignored here
Activation = Literal["topk", "jumprelu", "relu"]
ACTIVATIONS = ("topk", "jumprelu", "relu")
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".npz", ".npy")
MAX_CFG_BYTES = 1 << 20
REF_CACHE_VERSION = 1


class SAELoadError(ValueError):
    """An SAE directory that cannot be loaded; the message says why."""


# --------------------------------------------------------------------------------------------------------------
# The module


class SparseAutoencoder(nn.Module):
    """An SAE with SAELens' parameter names and inference semantics.

    encode(x) = act(pre),  pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc      [..., d_sae]
      topk:     keep the k largest pre-activations, ReLU them, zero the rest (SAELens ``TopK``);
                with ``rescale_acts_by_decoder_norm`` the pre-activations are first multiplied by the
                decoder row norms and decode divides them back out (SAELens' TopKSAE option).
      jumprelu: relu(pre) where pre > relu(threshold), else 0 (SAELens ``JumpReLUSAE.encode``).
      relu:     relu(pre) (SAELens' "standard" architecture).
    decode(z) = z @ W_dec + b_dec                                                         [..., d_in]

    Parameters are float32 by default; inputs of other dtypes (a bf16 model's activations) are cast.
    ``hook_name`` / ``hook_layer`` / ``model_name`` record where the SAE reads (SAELens naming:
    ``blocks.{l}.hook_resid_post`` = raw output of decoder block l).
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        activation: Activation = "topk",
        k: int | None = None,
        apply_b_dec_to_input: bool = True,
        rescale_acts_by_decoder_norm: bool = False,
        hook_layer: int | None = None,
        hook_name: str | None = None,
        model_name: str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"SAE activation must be one of {ACTIVATIONS}, got {activation!r}")
        if d_in < 1 or d_sae < 1:
            raise ValueError(f"SAE sizes must be >= 1, got d_in={d_in}, d_sae={d_sae}")
        if activation == "topk":
            if k is None or not 1 <= int(k) <= d_sae:
                raise ValueError(f"a top-k SAE needs 1 <= k <= d_sae={d_sae}, got k={k!r}")
            k = int(k)
        elif rescale_acts_by_decoder_norm:
            raise ValueError("rescale_acts_by_decoder_norm exists only for top-k SAEs (as in SAELens)")
        self.d_in, self.d_sae, self.activation, self.k = int(d_in), int(d_sae), activation, k
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.rescale_acts_by_decoder_norm = bool(rescale_acts_by_decoder_norm)
        self.hook_layer = hook_layer
        self.hook_name = hook_name or (f"blocks.{hook_layer}.hook_resid_post" if hook_layer is not None else None)
        self.model_name = model_name
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype))
        if activation == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        else:
            self.threshold = None

    # -- initialisation (training only; loading overwrites everything) ---------------------------------------
    @torch.no_grad()
    def init_tied_(self, generator: torch.Generator | None = None, data_mean: Tensor | None = None) -> "SparseAutoencoder":
        """Gao et al. 2024 init: random unit-norm decoder rows, W_enc = W_dec^T, b_enc = 0, b_dec = data mean."""
        w = torch.randn(self.d_sae, self.d_in, generator=generator, dtype=torch.float32)  # [d_sae, d_in]
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.T)
        self.b_enc.zero_()
        self.b_dec.copy_(data_mean if data_mean is not None else torch.zeros(self.d_in))
        return self

    # -- forward ---------------------------------------------------------------------------------------------
    def pre_activations(self, x: Tensor) -> Tensor:
        """[..., d_in] -> [..., d_sae]: the encoder's affine map on the (b_dec-centred) input."""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec  # SAELens process_sae_in: sae_in - b_dec * apply_b_dec_to_input
        pre = x @ self.W_enc + self.b_enc  # [..., d_sae]
        if self.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        return pre

    def activate(self, pre: Tensor) -> Tensor:
        """The sparse nonlinearity, [..., d_sae] -> [..., d_sae]."""
        if self.activation == "topk":
            vals, idx = pre.topk(self.k, dim=-1, sorted=False)  # [..., k]
            return torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        if self.activation == "jumprelu":
            return pre.relu() * (pre > self.threshold.relu()).to(pre.dtype)
        return pre.relu()

    def encode(self, x: Tensor) -> Tensor:
        """[..., d_in] -> sparse features [..., d_sae]."""
        return self.activate(self.pre_activations(x))

    def decode(self, z: Tensor) -> Tensor:
        """[..., d_sae] -> reconstruction [..., d_in]."""
        if self.rescale_acts_by_decoder_norm:
            z = z / self.W_dec.norm(dim=-1)
        return z @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.encode(x)  # [..., d_sae]
        return self.decode(z), z  # [..., d_in], [..., d_sae]

    # -- decoder geometry (training) -------------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every decoder row to unit L2 norm (Gao et al.: keeps the latents' scale identifiable)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_decoder_grad_(self) -> None:
        """Project out the gradient component along each decoder row (the row's norm is fixed at 1 anyway)."""
        g = self.W_dec.grad
        if g is None:
            return
        w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)  # [d_sae, d_in]
        g.sub_((g * w).sum(dim=1, keepdim=True) * w)

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        return f"d_in={self.d_in}, d_sae={self.d_sae}, activation={self.activation}{k}, hook={self.hook_name}"

    def config_dict(self) -> dict:
        """The structural part of cfg.json (what the weights mean)."""
        arch = {"topk": "topk", "jumprelu": "jumprelu", "relu": "standard"}[self.activation]
        cfg: dict[str, Any] = {
            "architecture": arch,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": _dtype_name(self.W_enc.dtype),
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": "none",
            # SAELens < 6 read the nonlinearity from these two keys.
            "activation_fn": "topk" if self.activation == "topk" else "relu",
            "activation_fn_kwargs": {"k": self.k} if self.activation == "topk" else {},
            "finetuning_scaling_factor": False,
        }
        if self.activation == "topk":
            cfg["k"] = self.k
            cfg["rescale_acts_by_decoder_norm"] = self.rescale_acts_by_decoder_norm
        return cfg


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "float64": torch.float64, "double": torch.float64}


def _parse_dtype(name: Any) -> torch.dtype | None:
    if name is None:
        return None
    if isinstance(name, torch.dtype):
        return name
    return _DTYPES.get(str(name).removeprefix("torch."))


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
    tensors = {
        "W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec,
        **({"threshold": sae.threshold} if sae.threshold is not None else {}),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
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
    if path.stat().st_size > MAX_CFG_BYTES:
        raise SAELoadError(f"{path}: larger than {MAX_CFG_BYTES} bytes, not an SAE config")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SAELoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise SAELoadError(f"{path}: expected a JSON object")
    return cfg


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


# --------------------------------------------------------------------------------------------------------------
# Activations: the raw output of block l


class _StopForward(Exception):
    """Raised by the capture hook to skip the blocks after the one we need (and the LM head)."""


def _decoder_stack(model: Any):
    """(decoder stack to call, its list of blocks). Handles a PEFT wrapper around the causal LM."""
    from arbiter.backbone import base_model, decoder_layers

    dec = base_model(model)
    layers = getattr(dec, "layers", None)
    if layers is None:
        layers = decoder_layers(model)
    return dec, layers


def block_output(model: Any, input_ids: Tensor, attention_mask: Tensor, layer: int, *, stop_early: bool = True) -> Tensor:
    """Raw output of decoder block ``layer`` (SAELens ``blocks.{layer}.hook_resid_post``): [B, T] -> [B, T, d].

    A forward hook captures the block's output (as ``arbiter.backbone.LayerCapture`` does). With
    ``stop_early`` the hook then raises to skip the later blocks, the final norm and the LM head: only
    ``layer + 1`` blocks run. Gradients are NOT disabled here: inside FPO training the result must be
    differentiable w.r.t. the policy; wrap the call in ``torch.no_grad()`` / ``inference_mode()`` otherwise.
    The hook is removed before returning, so gradient-checkpoint recomputation never sees it.
    """
    dec, layers = _decoder_stack(model)
    n = len(layers)
    if not -n <= layer < n:
        raise ValueError(f"layer {layer} out of range for a model with {n} decoder blocks")
    captured: list[Tensor] = []

    def hook(module, args, out):
        captured.append(out[0] if isinstance(out, (tuple, list)) else out)
        if stop_early:
            raise _StopForward

    handle = layers[layer].register_forward_hook(hook)
    try:
        dec(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"block {layer} did not run")
    return captured[0]


def pool_answer_features(hidden: Tensor, answer_mask: Tensor, sae: SparseAutoencoder) -> Tensor:
    """SAE features of every answer token, mean-pooled per row over its REAL answer tokens.

    hidden [N, T, d_in] (block l's raw output), answer_mask [N, T] (1 on answer tokens incl. the closing
    <|im_end|>, 0 on prompt and padding) -> [N, d_sae] (float32 or the SAE's dtype).
    Only answer tokens go through the SAE. The divisor is each row's own answer length: the authors' code
    divided by the padded length, which shrinks the features of short answers in a padded batch.
    Differentiable w.r.t. ``hidden`` (the SAE is usually frozen).
    """
    if hidden.dim() != 3 or answer_mask.shape != hidden.shape[:2]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and answer_mask {tuple(answer_mask.shape)} do not fit")
    mask = answer_mask.to(torch.bool)  # [N, T]
    lengths = mask.sum(dim=1)  # [N]
    if (lengths == 0).any():
        bad = (lengths == 0).nonzero().flatten().tolist()
        raise ValueError(f"rows {bad} have no answer tokens; cannot pool SAE features over an empty answer")
    rows, cols = mask.nonzero(as_tuple=True)  # [M], [M]: all answer tokens of the batch
    z = sae.encode(hidden[rows, cols])  # [M, d_sae]
    pooled = z.new_zeros(hidden.shape[0], sae.d_sae).index_add(0, rows, z)  # [N, d_sae]
    return pooled / lengths.to(pooled.dtype).unsqueeze(1)  # [N, d_sae]


def pooled_sae_features(
    model: Any, batch: dict[str, Tensor], sae: SparseAutoencoder, layer: int, *, stop_early: bool = True
) -> Tensor:
    """Run ``model`` on a ``collate_pairs``-style batch and return pooled SAE features [N, d_sae].

    batch: input_ids [N, T], attention_mask [N, T], answer_mask [N, T] (right-padded; for collate_pairs
    N = 2B, chosen rows first). Gradients flow to the model unless the caller disables them. Inside an FPO
    step that already runs the policy for its logits, capture the layer during that forward
    (``arbiter.backbone.LayerCapture``) and call :func:`pool_answer_features` instead: one forward, not two.
    """
    for key in ("input_ids", "attention_mask", "answer_mask"):
        if key not in batch:
            raise KeyError(f"pooled_sae_features needs batch[{key!r}] (collate_pairs keys)")
    hidden = block_output(model, batch["input_ids"], batch["attention_mask"], layer, stop_early=stop_early)  # [N, T, d]
    pooled = pool_answer_features(hidden, batch["answer_mask"], sae)  # [N, d_sae]
    if "answer_lengths" in batch:
        # The data API's lengths and the mask must agree, else the pooling divisor is not the answer length.
        expect = batch["answer_lengths"].to(batch["answer_mask"].device)
        if not torch.equal(batch["answer_mask"].sum(1).to(expect.dtype), expect):
            raise ValueError("batch['answer_lengths'] disagrees with batch['answer_mask'].sum(1)")
    return pooled


# --------------------------------------------------------------------------------------------------------------
# Offline reference features


def _weights_digest(model: Any, per_tensor: int = 4096) -> str:
    """Cheap identity of a model's weights: sha256 over names, shapes and the first elements of each tensor."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(p.detach().reshape(-1)[:per_tensor].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()


def _pairs_digest(tokenized_pairs: Sequence[Any]) -> str:
    h = hashlib.sha256()
    for tp in tokenized_pairs:
        for ids in (tp.prompt_ids, tp.chosen_ids, tp.rejected_ids):
            h.update(len(ids).to_bytes(4, "little"))
            h.update(torch.tensor(list(ids), dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def ref_cache_key(backbone: Any, tokenized_pairs: Sequence[Any], sae: SparseAutoencoder, layer: int) -> str:
    """What the cached reference features depend on: model weights, SAE, layer and every token id."""
    fp = getattr(backbone, "fingerprint", None)
    fp = fp.model_dump() if hasattr(fp, "model_dump") else repr(fp)
    parts = {
        "version": REF_CACHE_VERSION,
        "fingerprint": fp,
        "weights": _weights_digest(backbone.model),
        "sae": sae_digest(sae),
        "layer": int(layer),
        "pairs": _pairs_digest(tokenized_pairs),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _read_ref_cache(path: Path, key: str, n_pairs: int, d_sae: int) -> tuple[Tensor, Tensor] | None:
    """The cached features, or None (with a warning) if the file is missing, corrupted or stale."""
    if not path.is_file():
        return None
    sidecar = path.with_name(path.name + ".sha256")
    why = None
    try:
        want = sidecar.read_text().split()[0] if sidecar.is_file() else None
        if want is None:
            why = "no sha256 sidecar"
        elif file_sha256(path) != want:
            why = "sha256 mismatch (file corrupted or partially written)"
        else:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
            if meta.get("key") != key:
                why = "cache key mismatch"
            else:
                t = load_file(str(path))
                chosen, rejected = t.get("chosen"), t.get("rejected")
                if chosen is None or rejected is None or tuple(chosen.shape) != (n_pairs, d_sae) or chosen.shape != rejected.shape:
                    why = "unexpected tensors or shapes"
                else:
                    return chosen, rejected
    except (OSError, SafetensorError, ValueError, IndexError) as e:
        why = f"unreadable ({e})"
    log.warning("reference feature cache %s is unusable: %s; rebuilding it", path, why)
    return None


def _write_ref_cache(path: Path, key: str, chosen: Tensor, rejected: Tensor, layer: int) -> None:
    """safetensors file via temp + rename, then its sha256 sidecar (also atomic). A crash between the two
    leaves a sidecar that does not match, which the reader detects and rebuilds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, tmp,
                  metadata={"key": key, "layer": str(layer), "pairs": str(chosen.shape[0]), "format": "pt"})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        digest = file_sha256(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_text(path.with_name(path.name + ".sha256"), f"{digest}  {path.name}\n")


def precompute_ref_features(
    backbone: Any,
    tokenized_pairs: Sequence[Any],
    sae: SparseAutoencoder,
    layer: int,
    *,
    batch_size: int = 8,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """Pooled SAE features of the frozen reference model for every pair: (chosen [P, d_sae], rejected [P, d_sae]).

    The full pooled vector is kept (not only its top-k), because FPO picks the k features by the POLICY's
    values at training time (docs/methods.md). ``backbone`` is an ``arbiter.backbone.Backbone`` holding the
    reference weights (the base model; with LoRA, compute this before attaching the adapter).
    With ``cache_dir`` the result is stored as ``ref_features-<key>.safetensors`` + a ``.sha256`` sidecar,
    keyed by the model weights, SAE, layer and every token id; a corrupted or stale cache is rebuilt.
    Pairs are batched by length (less padding) and the results put back in the input order.
    """
    from arbiter.training.data import collate_pairs

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(tokenized_pairs)
    if n == 0:
        raise ValueError("precompute_ref_features: no pairs")
    path = None
    key = None
    if cache_dir is not None:
        key = ref_cache_key(backbone, tokenized_pairs, sae, layer)
        path = Path(cache_dir) / f"ref_features-{key[:24]}.safetensors"
        cached = _read_ref_cache(path, key, n, sae.d_sae)
        if cached is not None:
            log.info("reference features: loaded %d pairs from %s", n, path)
            return cached

    model = backbone.model
    device = next(model.parameters()).device
    sae_device = next(sae.parameters()).device
    chosen = torch.zeros(n, sae.d_sae, dtype=torch.float32)  # [P, d_sae]
    rejected = torch.zeros(n, sae.d_sae, dtype=torch.float32)  # [P, d_sae]
    order = sorted(range(n), key=lambda i: -(len(tokenized_pairs[i].prompt_ids)
                                              + max(len(tokenized_pairs[i].chosen_ids), len(tokenized_pairs[i].rejected_ids))))
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    it: Iterable = batches
    if progress and tqdm is not None:
        it = tqdm(batches, desc="reference SAE features", unit="batch")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for idx in it:
                batch = collate_pairs([tokenized_pairs[i] for i in idx], pad_id=backbone.end_id)
                hidden = block_output(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), layer)
                pooled = pool_answer_features(hidden.to(sae_device), batch["answer_mask"].to(sae_device), sae)  # [2b, d_sae]
                pooled = pooled.float().cpu()
                b = len(idx)
                ix = torch.tensor(idx)
                chosen[ix] = pooled[:b]  # collate_pairs: chosen rows first, then rejected
                rejected[ix] = pooled[b:]
    finally:
        model.train(was_training)
    if path is not None:
        _write_ref_cache(path, key, chosen, rejected, layer)
        log.info("reference features: wrote %s", path)
    return chosen, rejected


# --------------------------------------------------------------------------------------------------------------
# Training (used by recipes/sae.py)


@dataclass
class StepResult:
    loss: float  # total loss (MSE + aux_coef * AuxK)
    mse: float  # reconstruction MSE in the training (scaled) space, mean over tokens and dims
    aux: float  # AuxK loss (0 when no latent is dead)
    l0: float  # mean number of active latents per token
    fired: Tensor  # [d_sae] bool: latents active on some token of this batch
    sq_err: float  # sum of squared reconstruction errors (for FVE)
    n_tokens: int


def auxk_loss(sae: SparseAutoencoder, pre: Tensor, residual: Tensor, dead: Tensor, aux_k: int) -> Tensor:
    """Gao et al. 2024 AuxK: reconstruct the main reconstruction's residual from the top ``aux_k``
    pre-activations among DEAD latents only (no bias), so dead latents get a gradient.

    pre [N, d_sae], residual [N, d_in] (x - x_hat, detached), dead [d_sae] bool -> scalar MSE.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    k = min(aux_k, n_dead)
    masked = pre.masked_fill(~dead, float("-inf"))  # [N, d_sae]: only dead latents can win
    vals, idx = masked.topk(k, dim=-1, sorted=False)  # [N, k]
    z_aux = torch.zeros_like(pre).scatter(-1, idx, vals.relu())  # [N, d_sae]
    recon_aux = z_aux @ sae.W_dec  # [N, d_in]
    return (recon_aux - residual).pow(2).mean()


def train_step(
    sae: SparseAutoencoder,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    *,
    dead: Tensor | None = None,
    aux_k: int = 256,
    aux_coef: float = 1.0 / 32.0,
    max_grad_norm: float | None = None,
) -> StepResult:
    """One optimisation step on activations x [N, d_in] (already in training scale).

    Loss = MSE(x_hat, x) + aux_coef * AuxK (if ``dead`` marks dead latents). Before the optimiser step the
    gradient component parallel to each decoder row is removed; after it the rows are renormalised to unit
    norm (Gao et al. 2024, Sec. 2.x / App. A). Raises FloatingPointError on a non-finite loss, before any
    parameter changes.
    """
    x = x.to(sae.W_enc.dtype)
    pre = sae.pre_activations(x)  # [N, d_sae]
    z = sae.activate(pre)  # [N, d_sae]
    recon = sae.decode(z)  # [N, d_in]
    err = recon - x  # [N, d_in]
    mse = err.pow(2).mean()
    aux = pre.new_zeros(())
    if dead is not None and aux_coef > 0 and bool(dead.any()):
        aux = auxk_loss(sae, pre, (x - recon).detach(), dead, aux_k)
    loss = mse + aux_coef * aux
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite SAE loss (mse={mse.item()}, aux={aux.item()})")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_parallel_decoder_grad_()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), max_grad_norm)
    optimizer.step()
    sae.normalize_decoder_()
    with torch.no_grad():
        active = z > 0  # [N, d_sae]
        return StepResult(
            loss=float(loss), mse=float(mse), aux=float(aux), l0=float(active.sum(1).float().mean()),
            fired=active.any(0), sq_err=float(err.pow(2).sum()), n_tokens=int(x.shape[0]),
        )


@torch.no_grad()
def reconstruction_stats(sae: SparseAutoencoder, x: Tensor, *, chunk: int = 4096) -> dict[str, Any]:
    """Metrics of an SAE on activations x [N, d_in] (in the SAE's own units).

    mse: mean over tokens and dims of (x_hat - x)^2; fve: fraction of variance explained
    1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2; l0: mean active latents per token; fired [d_sae] bool.
    """
    x = x.to(sae.W_enc.dtype)
    mean = x.mean(0, keepdim=True)  # [1, d_in]
    sq_err = 0.0
    l0 = 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=x.device)
    for i in range(0, x.shape[0], chunk):
        xb = x[i:i + chunk]
        recon, z = sae(xb)
        sq_err += float((recon - xb).pow(2).sum())
        l0 += float((z > 0).sum())
        fired |= (z > 0).any(0)
    var = float((x - mean).pow(2).sum())
    n = x.shape[0]
    return {
        "mse": sq_err / (n * sae.d_in),
        "fve": 1.0 - sq_err / var if var > 0 else float("nan"),
        "l0": l0 / n,
        "fired": fired,
        "n_tokens": n,
    }


def fold_input_scale(sae: SparseAutoencoder, scale: float) -> SparseAutoencoder:
    """A copy of an SAE trained on ``scale * x`` that takes unscaled x, decoder rows unchanged.

    With x' = s x:  pre(x') = (s x - b_dec) W_enc + b_enc = s [(x - b_dec/s) W_enc + b_enc/s], and top-k /
    ReLU commute with a positive factor, so encode'(x) = encode(x') / s with b_enc' = b_enc / s,
    b_dec' = b_dec / s; decode'(z/s) = (z W_dec + b_dec) / s = decode(z) / s. W_enc and the unit-norm W_dec
    stay as they are, so latents come out in the model's own activation units. (JumpReLU: threshold / s.)
    """
    out = SparseAutoencoder(
        sae.d_in, sae.d_sae, activation=sae.activation, k=sae.k, apply_b_dec_to_input=sae.apply_b_dec_to_input,
        rescale_acts_by_decoder_norm=sae.rescale_acts_by_decoder_norm, hook_layer=sae.hook_layer,
        hook_name=sae.hook_name, model_name=sae.model_name, dtype=sae.W_enc.dtype,
    )
    if not sae.apply_b_dec_to_input:
        raise ValueError("fold_input_scale assumes apply_b_dec_to_input=True")
    with torch.no_grad():
        out.W_enc.copy_(sae.W_enc)
        out.W_dec.copy_(sae.W_dec)
        out.b_enc.copy_(sae.b_enc / scale)
        out.b_dec.copy_(sae.b_dec / scale)
        if sae.threshold is not None:
            out.threshold.copy_(sae.threshold / scale)
    return out


def default_d_sae(d_in: int, expansion: int = 8) -> int:
    """Default SAE width: 8 x d_in (4608 for SmolLM2-135M's d = 576)."""
    return expansion * d_in


__all__ = [
    "SAELoadError", "SparseAutoencoder", "save_sae", "load_sae", "read_sae_config", "resolve_sae_dir", "hook_name_for_layer",
    "layer_from_hook_name", "block_output", "pool_answer_features", "pooled_sae_features",
    "precompute_ref_features", "ref_cache_key", "sae_digest", "train_step", "auxk_loss", "StepResult",
    "reconstruction_stats", "fold_input_scale", "default_d_sae",
]
