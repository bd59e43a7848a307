"""Head configuration: the JSON half of a head on disk (``head_config.json``)."""

from __future__ import annotations

from math import prod
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from arbiter.confidence import ScoreName

FORMAT_VERSION = 1
POOLERS = ("identity", "affine_tanh", "swiglu_tanh")
PoolerName = Literal["identity", "affine_tanh", "swiglu_tanh"]
# Layer convention: -1 means "the hidden state the LM head reads" (after the final norm). A value
# 0 <= l < num_layers means the raw output of block l (captured with a forward hook).
FINAL_NORM_LAYER = -1
# THE name rule for heads and served model / adapter ids: letters, digits, ``_.-``, at most 64 characters, not
# starting with punctuation (safe as a path component, a URL segment and a metric label).
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
# Size caps, checked before anything is allocated (SECURITY.md "Heads"): a head config is a small file anyone who
# can write the heads directory controls, and its sizes decide what the loader allocates.
MAX_HIDDEN_SIZE = 1 << 16
MAX_FFN_SIZE = 1 << 18
MAX_LAYERS = 1024
MAX_HEAD_PARAMETERS = 1 << 29  # 2 GiB of float32, the weights file's own cap (heads/io.py MAX_WEIGHTS_BYTES)


class BackboneFingerprint(BaseModel):
    """Identifies the backbone a head was trained on. Loading onto another backbone is refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str
    hidden_size: int = Field(gt=0, le=MAX_HIDDEN_SIZE)
    num_layers: int = Field(gt=0, le=MAX_LAYERS)
    vocab_hash: str = Field(min_length=8)
    # The token that closes an assistant turn, where the feature is read (derived from the chat template;
    # heads written before it was recorded were all made on ChatML models).
    end_token: str = "<|im_end|>"

    def mismatches(self, other: "BackboneFingerprint") -> list[str]:
        """Names of fields that differ, with both values, for a clear error message."""
        out = []
        for field in ("model_name", "hidden_size", "num_layers", "vocab_hash", "end_token"):
            a, b = getattr(self, field), getattr(other, field)
            if a != b:
                out.append(f"{field}: head has {a!r}, backbone has {b!r}")
        return out


# THE selection policy names (arbiter.selection implements them; the request schema and the recipes import these).
PolicyName = Literal["argmax", "weighted_vote", "majority_vote", "verify", "confidence", "deepconf_vote", "borda", "cisc"]
POLICIES: tuple[str, ...] = PolicyName.__args__  # type: ignore[attr-defined]  # a Literal's values, in order
# The training-free policies: they rank by the model's own confidence in each candidate (arbiter.confidence), not
# by a head's reward; of these, all but ``confidence`` (argmax) vote over extracted answers.
CONFIDENCE_POLICIES = ("confidence", "deepconf_vote", "borda", "cisc")
ExtractorName = Literal["last_number", "choice_letter", "label_words", "regex", "json_field"]


class SelectionRule(BaseModel):
    """How a rerank request that names this head (first) and gives no ``select`` picks among the candidates:
    the policy, and for the vote policies how an answer is read from a candidate (``arbiter.answers``).
    ``arbiter train verifier`` records the rule that won on its dev questions (README "Heads carry their rule")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    select: PolicyName = "argmax"
    extractor: ExtractorName | None = None
    pattern: str | None = Field(None, min_length=1, max_length=256)  # extractor=regex: one capturing group
    field: str | None = Field(None, min_length=1, max_length=128)  # extractor=json_field: a dotted path
    labels: list[str] | None = Field(None, min_length=1, max_length=32)  # extractor=label_words
    # Answer-level verification (select=verify, README "Verifying answers"): how an extracted answer is rendered
    # before the head scores it ({answer}; {option}: the listed text of an option letter), and the weights of the
    # group score = canonical reward + vote_weight x vote share + text_weight x the group's best text reward.
    canonical: str | None = Field(None, min_length=1, max_length=256)
    vote_weight: float = Field(0.0, ge=0.0, le=100.0)
    text_weight: float = Field(0.0, ge=0.0, le=100.0)
    # The training-free policies (confidence, deepconf_vote, borda, cisc): the confidence score ranked by and, for
    # DeepConf's vote, the share kept (None: the policy's defaults, arbiter.selection.ConfidenceRule). The verifier
    # recipe writes one when its head does not beat the best free rule on dev.
    score: ScoreName | None = None
    keep: float | None = Field(None, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _usable(self) -> "SelectionRule":
        from arbiter.answers import check_canonical, extractor

        if self.select not in ("argmax", "confidence") and self.extractor is None:
            raise ValueError(f"select {self.select} needs an extractor")
        if self.labels is not None and any(len(x) > 64 for x in self.labels):
            raise ValueError("labels must be at most 64 characters each")
        if self.extractor is not None:
            extractor(self.extractor, pattern=self.pattern, field=self.field, labels=self.labels)  # ValueError if unusable
        if self.select == "verify" and self.canonical is None:
            raise ValueError("select verify needs canonical (the template an extracted answer is scored in)")
        if self.canonical is not None:
            check_canonical(self.canonical, self.extractor)
        if (self.score is not None or self.keep is not None) and self.select not in CONFIDENCE_POLICIES:
            raise ValueError(f"score / keep belong to the training-free policies {CONFIDENCE_POLICIES}, not {self.select}")
        return self

    def describe(self) -> dict[str, Any]:
        out = self.model_dump(exclude_none=True)
        if self.select != "verify":  # the weights mean something only to verify
            out.pop("vote_weight", None)
            out.pop("text_weight", None)
        return out


class HeadConfig(BaseModel):
    """Everything needed to rebuild a head's modules and to check it fits a backbone."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    name: str = Field(min_length=1, max_length=64, pattern=rf"^{NAME_PATTERN}$")
    backbone: BackboneFingerprint
    layer: int = FINAL_NORM_LAYER
    pooler: PoolerName = "identity"
    hidden_size: int = Field(gt=0, le=MAX_HIDDEN_SIZE)
    ffn_size: int | None = Field(default=None, gt=0, le=MAX_FFN_SIZE)  # SwiGLU pooler width (the backbone's FFN width)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    # The dtype the backbone ran in when the training features were made (heads are float32 themselves).
    feature_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # The selection rule rerank applies when the request names this head first and gives no ``select``.
    selection: SelectionRule | None = None
    # Free-form record of how the head was made: data, loss, eps, metrics (dev accuracy, margins).
    provenance: dict[str, Any] = Field(default_factory=dict)

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != FORMAT_VERSION:
            raise ValueError(f"unknown head format_version {v}; this Arbiter reads version {FORMAT_VERSION}")
        return v

    def model_post_init(self, __context: Any) -> None:
        if self.hidden_size != self.backbone.hidden_size:
            raise ValueError(
                f"hidden_size {self.hidden_size} differs from the backbone's {self.backbone.hidden_size}"
            )
        if self.pooler == "swiglu_tanh" and self.ffn_size is None:
            raise ValueError("pooler 'swiglu_tanh' needs ffn_size")
        if self.layer < FINAL_NORM_LAYER or self.layer >= self.backbone.num_layers:
            raise ValueError(f"layer {self.layer} is outside [-1, {self.backbone.num_layers - 1}]")
        n = sum(prod(shape) for shape in self.tensor_shapes().values())
        if n > MAX_HEAD_PARAMETERS:
            raise ValueError(f"this head would have {n} parameters, more than the {MAX_HEAD_PARAMETERS} a head may have")

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """The weights file's tensors and shapes for this config (the modules of heads/modules.py), known before
        any module is built."""
        d = self.hidden_size
        shapes: dict[str, tuple[int, ...]] = {"reward.weight": (1, d)}
        if self.pooler == "affine_tanh":
            shapes |= {"pooler.dense.weight": (d, d), "pooler.dense.bias": (d,)}
        elif self.pooler == "swiglu_tanh":
            f = self.ffn_size or 0
            shapes |= {"pooler.w_in.weight": (2 * f, d), "pooler.w_in.bias": (2 * f,), "pooler.w_out.weight": (d, f),
                       "pooler.w_out.bias": (d,)}
        return shapes

    def dtype_warning(self, running_dtype: str | None) -> str | None:
        """The warning to log when the backbone runs in another dtype than the head's training features were
        made in (serving and evaluation both pick ``dtype=auto``: float32 where bf16 is not native and faster),
        or None when they agree. docs/features.md says what the difference changes."""
        if not running_dtype or running_dtype == self.feature_dtype:
            return None
        return (f"head {self.name} was trained on {self.feature_dtype} features and runs on {running_dtype} ones "
                "(benchmarks/reports/feature_extraction_*.md measures what that changes)")
