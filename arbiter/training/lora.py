"""LoRA on the backbone: attach a fresh trainable adapter (and take it off again), the policy module every LoRA
recipe trains, the reference pass with the adapter disabled, saving in PEFT format and loading a saved adapter
back for evaluation."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from arbiter.fsutil import atomic_dir
from arbiter.training.config import ConfigError
from arbiter.training.logprobs import forward_logps, split_pairs
from arbiter.training.reference import precomputed_ref
from arbiter.training.sections import LoraSection

if TYPE_CHECKING:
    from arbiter.training.sae import SparseAutoencoder

ADAPTER_META_FILE = "arbiter_adapter.json"


def resolve_backbone(model_spec: str | None, backbone: Any | None) -> Any:
    if backbone is not None:
        return backbone
    from arbiter.backbone import load_backbone

    return load_backbone(model_spec)


def attach_lora(model: Any, section: LoraSection, *, gradient_checkpointing: bool = False) -> tuple[Any, Callable[[], None]]:
    """Wrap ``model`` with a fresh trainable LoRA adapter; returns (peft model, restore) where ``restore()``
    removes the adapter again and restores requires_grad / train mode (the backbone object is shared)."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in section.target_modules if t not in names]
    if missing:
        raise ConfigError(f"lora.target_modules {missing} do not exist in {type(model).__name__}")
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pcfg = LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,  # type: ignore[arg-type]  # peft takes a float alpha
        lora_dropout=section.dropout,
        target_modules=list(section.target_modules), bias="none", task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, pcfg)

    def restore() -> None:
        base: Any = peft_model.unload()  # removes the LoRA layers (no merge): the base weights are untouched
        if hasattr(base, "peft_config"):
            del base.peft_config
        if gradient_checkpointing:
            base.gradient_checkpointing_disable()
        for n, p in base.named_parameters():
            p.requires_grad_(grad_flags.get(n, p.requires_grad))
        base.train(was_training)

    return peft_model, restore


@contextmanager
def training_lora(bb: Any, section: LoraSection, device: Any, *, gradient_checkpointing: bool = False,
                  caller_owned: bool = False) -> Iterator[Any]:
    """The backbone moved to ``device`` with a fresh trainable LoRA adapter (``attach_lora``), for one training run;
    on exit the adapter is removed and, when the caller lent the backbone (``caller_owned``), the model goes back
    to the device it came from."""
    home = next(bb.model.parameters()).device
    bb.model.to(device)
    peft_model, detach = attach_lora(bb.model, section, gradient_checkpointing=gradient_checkpointing)
    try:
        yield peft_model
    finally:
        detach()
        if caller_owned:
            bb.model.to(home)


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


class PolicyModule(nn.Module):
    """Everything the policy pass trains, as one module whose forward is the whole pass (so that
    accelerate/DDP sees one module and syncs the gradients of LoRA, head and projection alike)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: Sequence[int] = (),
        projection: nn.Module | None = None,
        apply_final_norm: bool = True,
        head: nn.Module | None = None,
        detach_head_features: bool = False,
        sae: SparseAutoencoder | None = None,
        sae_layer: int | None = None,
    ):
        if (sae is None) != (sae_layer is None):
            raise ValueError("PolicyModule: give sae and sae_layer together")
        super().__init__()
        self.model = model
        self.layers = list(layers)
        self.projection = projection
        self.apply_final_norm = apply_final_norm
        self.head = head
        self.detach_head_features = detach_head_features
        self.sae = sae
        self.sae_layer = sae_layer

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        out = forward_logps(
            self.model, batch,
            layers=self.layers,
            projection=self.projection if self.projection is not None else "lm_head",
            apply_final_norm=self.apply_final_norm,
            end_features=self.head is not None,
            capture_layers=[self.sae_layer] if self.sae_layer is not None else (),
        )
        res = {"logps": out.logps, "lengths": out.lengths}  # [2B], [2B]
        if out.layer_logps is not None:
            res["layer_logps"] = out.layer_logps  # [K, 2B]
        if self.head is not None and out.end_hidden is not None:
            feats = out.end_hidden.detach() if self.detach_head_features else out.end_hidden  # [2B, d]
            res["head_rewards"] = self.head(feats).float()  # [2B]
        if self.sae is not None and self.sae_layer is not None:
            from arbiter.training.sae import pool_answer_features

            hidden = out.captured[self.sae_layer]  # [2B, T, d]
            mask = batch["answer_mask"].to(hidden.device)
            res["features"] = pool_answer_features(hidden, mask, self.sae).float()  # [2B, F]
        return res


def reference_pass(peft_model: Any, batch: dict[str, Tensor], *, layers: Sequence[int] = (),
                   apply_final_norm: bool = True) -> dict[str, Tensor]:
    """The base model's log-probs: the same network with the adapter disabled, no grad."""
    with torch.no_grad(), peft_model.disable_adapter():
        out = forward_logps(peft_model, batch, layers=layers, apply_final_norm=apply_final_norm)
    res = {"logps": out.logps}
    if out.layer_logps is not None:
        res["layer_logps"] = out.layer_logps
    return res


class Reference:
    """Where a LoRA recipe's reference log-probs come from, decided once (``reference.decide_reference``) and asked
    per step: ``precomputed`` (the data's ``ref_*`` columns, no forward), ``adapter_disabled`` (the same network
    with the adapter off, no grad) or ``none`` (a reference-free loss such as SimPO). The adapter and joint recipes
    both use it, so the rule is written once."""

    MODES = ("precomputed", "adapter_disabled", "none")

    def __init__(self, mode: str, peft_model: Any, *, layers: Sequence[int] = (), apply_final_norm: bool = True,
                 precomputed_layers: bool = False, precomputed_features: bool = False):
        if mode not in self.MODES:
            raise ValueError(f"reference mode {mode!r} is not one of {self.MODES}")
        self.mode, self.peft_model = mode, peft_model
        self.layers, self.apply_final_norm = tuple(layers), apply_final_norm
        self.precomputed_layers, self.precomputed_features = precomputed_layers, precomputed_features

    def __call__(self, batch: dict[str, Tensor], chunk: Sequence[Any], device: torch.device) -> dict[str, Tensor] | None:
        """The reference of one micro-batch: ``batch`` (collated tensors) or ``chunk`` (its pairs, for the columns)."""
        if self.mode == "precomputed":
            return precomputed_ref(chunk, device, layers=self.precomputed_layers, features=self.precomputed_features)
        if self.mode == "adapter_disabled":
            return reference_pass(self.peft_model, batch, layers=self.layers, apply_final_norm=self.apply_final_norm)
        return None


def save_adapter(peft_model: Any, directory: Path, meta: dict[str, Any], extra_tensors: dict[str, Tensor] | None = None) -> Path:
    """PEFT format (adapter_config.json + adapter_model.safetensors), written atomically, plus provenance."""
    from safetensors.torch import save_file

    with atomic_dir(directory) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            if not (tmp / name).is_file():
                raise RuntimeError(f"PEFT did not write {name}")
        (tmp / ADAPTER_META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        if extra_tensors:
            save_file({k: v.detach().cpu().float().contiguous() for k, v in extra_tensors.items()},
                      str(tmp / "inter_projection.safetensors"))
    return directory


@contextmanager
def loaded_adapter(backbone: Any, adapter_dir: str | Path) -> Iterator[Any]:
    """Temporarily load a saved adapter onto ``backbone.model`` (removed again on exit)."""
    from peft import PeftModel

    d = Path(adapter_dir)
    if not (d / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{d} is not a PEFT adapter directory (no adapter_config.json)")
    meta_path = d / ADAPTER_META_FILE
    if meta_path.is_file():
        fp = json.loads(meta_path.read_text()).get("backbone")
        if fp:
            bad = backbone.fingerprint.mismatches(type(backbone.fingerprint)(**fp))
            if bad:
                raise ValueError(f"{d}: adapter was trained on another backbone: " + "; ".join(bad))
    was_training = backbone.model.training
    peft_model = PeftModel.from_pretrained(backbone.model, str(d), is_trainable=False)
    peft_model.eval()
    try:
        yield peft_model
    finally:
        base = peft_model.unload()
        if hasattr(base, "peft_config"):
            del base.peft_config
        base.train(was_training)


def adapter_pair_accuracy(
    backbone: Any,
    adapter_dir: str | Path,
    pairs: Sequence[Any],
    beta: float = 0.1,
    *,
    max_length: int = 1024,
    batch_size: int = 8,
    length_normalize: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Share of pairs whose implicit reward prefers the chosen answer, r(y) = beta (logp_adapter - logp_base).

    ``pairs``: PreferencePair (tokenised here with the shared chat encoding) or TokenizedPair.
    ``length_normalize``: use average instead of summed log-probs (SimPO/MIPO/FPO-style rewards).
    Returns accuracy (ties count as wrong, like TRL's strict >), ties, the TRL reward means, the mean
    log-probs, and ``base_logp_accuracy``: how often the base model alone already gives y_w the higher
    log-prob (summed, or averaged with length_normalize): the baseline the adapter must beat.
    """
    from tqdm.auto import tqdm

    from arbiter.training.data import TokenizedPair, collate_pairs, tokenize_pairs

    pairs = list(pairs)
    if not pairs:
        raise ValueError("adapter_pair_accuracy: no pairs")
    report = None
    if isinstance(pairs[0], TokenizedPair):
        tokenized = pairs
    else:
        tokenized, rep = tokenize_pairs(pairs, backbone.tokenizer, backbone.end_id, max_length=max_length)
        report = rep.to_dict()
    pol_c: list[Tensor] = []
    pol_r: list[Tensor] = []
    ref_c: list[Tensor] = []
    ref_r: list[Tensor] = []
    len_c: list[Tensor] = []
    len_r: list[Tensor] = []
    with loaded_adapter(backbone, adapter_dir) as peft_model:
        with torch.no_grad():
            for s in tqdm(range(0, len(tokenized), batch_size), desc="adapter pairs", disable=not progress):
                batch = collate_pairs(tokenized[s : s + batch_size], backbone.end_id)
                pol, lengths = forward_logps(peft_model, batch).logps, batch["answer_lengths"]
                with peft_model.disable_adapter():
                    ref = forward_logps(peft_model, batch).logps
                for dst, src in ((pol_c, pol), (ref_c, ref), (len_c, lengths)):
                    dst.append(split_pairs(src.cpu())[0])
                for dst, src in ((pol_r, pol), (ref_r, ref), (len_r, lengths)):
                    dst.append(split_pairs(src.cpu())[1])
    pc, pr, rc, rr = (torch.cat(x).double() for x in (pol_c, pol_r, ref_c, ref_r))
    lc, lr = torch.cat(len_c).double().clamp(min=1), torch.cat(len_r).double().clamp(min=1)
    if length_normalize:
        pc, rc, pr, rr = pc / lc, rc / lc, pr / lr, rr / lr
    chosen = beta * (pc - rc)  # [P]
    rejected = beta * (pr - rr)  # [P]
    return {
        "n": len(tokenized),
        "accuracy": (chosen > rejected).double().mean().item(),
        "ties": (chosen == rejected).double().mean().item(),
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "logps/chosen": pc.mean().item(),
        "logps/rejected": pr.mean().item(),
        "base_logp_accuracy": (rc > rr).double().mean().item(),
        "beta": beta,
        "length_normalize": length_normalize,
        "tokenize_report": report,
    }
