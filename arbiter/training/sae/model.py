"""The SAE module: SAELens-compatible parameters and activations (see the package docstring)."""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import Tensor, nn

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
        self.threshold: nn.Parameter | None
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
            assert self.k is not None  # __init__ requires k for topk
            vals, idx = pre.topk(self.k, dim=-1, sorted=False)  # [..., k]
            return torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        if self.activation == "jumprelu":
            assert self.threshold is not None  # __init__ makes it for jumprelu
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
