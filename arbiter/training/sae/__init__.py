"""Sparse autoencoders (SAEs) on one layer's residual stream, for FPO (docs/methods.md, "Policy losses": `fpo`).

What lives here (model.py, io.py, features.py, train.py, data.py; everything is re-exported from the package):
- :class:`SparseAutoencoder`: SAELens-compatible parameters ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
  ``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` and, for JumpReLU, ``threshold [d_sae]``; activations
  ``topk`` (k), ``jumprelu`` and ``relu``, computed exactly as SAELens' inference classes do.
- :func:`save_sae` / :func:`load_sae`: the SAELens on-disk layout (``cfg.json`` + ``sae_weights.safetensors``).
  ``load_sae`` also reads SAEs written by SAELens itself (5.x flat configs and 6.x ``metadata`` configs),
  never reads a pickle, and checks every shape.
- :func:`block_output`: the RAW output of decoder block ``l`` (through the one capture hook,
  ``arbiter.backbone.LayerCapture``, stopping the forward there), which is what SAELens' ``blocks.{l}.hook_resid_post`` means. NOT
  ``hidden_states[num_layers]``: transformers applies the final norm there (docs/methods.md).
- :class:`TokenSequence`, :func:`load_sequences`, :class:`ActivationStream`: the SAE recipe's data side (pairs or
  text -> sequences -> a resumable, seeded stream of activation batches).
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

from .data import ActivationStream, TokenSequence, load_sequences, sequence_activations
from .features import block_output, pool_answer_features, pooled_sae_features, precompute_ref_features, ref_cache_key
from .io import (
    hook_name_for_layer,
    layer_from_hook_name,
    load_sae,
    read_sae_config,
    resolve_sae_dir,
    sae_digest,
    save_sae,
)
from .model import (
    ACTIVATIONS,
    CFG_FILE,
    MAX_CFG_BYTES,
    REF_CACHE_VERSION,
    SPARSITY_FILE,
    WEIGHTS_FILE,
    Activation,
    SAELoadError,
    SparseAutoencoder,
)
from .train import StepResult, auxk_loss, default_d_sae, fold_input_scale, reconstruction_stats, train_step

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "CFG_FILE",
    "MAX_CFG_BYTES",
    "REF_CACHE_VERSION",
    "SAELoadError",
    "SPARSITY_FILE",
    "SparseAutoencoder",
    "WEIGHTS_FILE",
    "hook_name_for_layer",
    "layer_from_hook_name",
    "load_sae",
    "read_sae_config",
    "resolve_sae_dir",
    "sae_digest",
    "save_sae",
    "block_output",
    "ActivationStream",
    "TokenSequence",
    "load_sequences",
    "sequence_activations",
    "pool_answer_features",
    "pooled_sae_features",
    "precompute_ref_features",
    "ref_cache_key",
    "StepResult",
    "auxk_loss",
    "default_d_sae",
    "fold_input_scale",
    "reconstruction_stats",
    "train_step",
]
