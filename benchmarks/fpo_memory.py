"""FPO's memory point, measured: a training step with no reference model in memory vs DPO's reference copy.

FPO (docs/methods.md) needs from the reference model only numbers that can be computed once, offline: the
length-normalised answer log-probs and the pooled SAE features of every answer. DPO's usual implementation
keeps a frozen copy of the model to compute the reference log-probs on the fly. Each variant below runs
in a FRESH Python process (so its peak RSS is its own), on the real embedded model, with the same batch:

  load          the model loaded + one no-grad forward (the floor every variant pays)
  precompute    the offline pass FPO needs once: reference log-probs + SAE features of the batch, saved
  dpo_full      full-parameter policy + deep-copied frozen reference, one forward each, AdamW step
  fpo_full      full-parameter policy + SAE; reference log-probs and features loaded from `precompute`
  dpo_lora      LoRA policy; reference = the same weights with the adapter disabled (no copy, 2nd forward)
  fpo_lora      LoRA policy + SAE; reference from `precompute`

Figures: peak RSS (ru_maxrss) of the process, and an exact tensor count (parameters, gradients, optimiser
state, reference copy, SAE, cached reference features). On CUDA also torch.cuda.max_memory_allocated.
Writes benchmarks/reports/fpo_memory.md and .json. Usage:
    python benchmarks/fpo_memory.py [--pairs 2] [--max-length 128] [--layer 24] [--steps 2] [--sae DIR]
The SAE is random (d_sae = 8 x d) unless --sae names a trained one: its memory does not depend on training.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _provenance import git_commit  # benchmarks/ is on sys.path: the script's own directory

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("load", "precompute", "dpo_full", "fpo_full", "dpo_lora", "fpo_lora")
MiB = 1024 * 1024


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_now_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _opt_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(_bytes(v for v in st.values() if torch.is_tensor(v)) for st in opt.state.values())


def _batch(bb, pairs: int, max_length: int):
    from arbiter.training.data import collate_pairs, load_pairs, tokenize_pairs

    raw, _ = load_pairs("hh-rlhf", limit=max(8 * pairs, 32), seed=0)
    tok, _ = tokenize_pairs(raw, bb.tokenizer, bb.end_id, max_length=max_length)
    tok = tok[:pairs]
    if len(tok) < pairs:
        raise SystemExit(f"only {len(tok)} hh-rlhf pairs fit max_length={max_length}")
    return tok, collate_pairs(tok, pad_id=bb.end_id)


def _sae(args, d_in: int):
    from arbiter.training.sae import SparseAutoencoder, load_sae

    if args.sae:
        sae = load_sae(args.sae, expect_d_in=d_in)
    else:
        sae = SparseAutoencoder(d_in, 8 * d_in, activation="topk", k=32, hook_layer=args.layer).init_tied_(
            torch.Generator().manual_seed(0))
    return sae.requires_grad_(False)


def _lora(model):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, cfg)


def child(args) -> dict:
    """One variant in this process; returns its figures."""
    from arbiter.backbone import load_backbone
    from arbiter.training.logprobs import forward_logps
    from arbiter.training.losses import dpo, fpo
    from arbiter.training.sae import pool_answer_features, precompute_ref_features

    torch.manual_seed(0)
    v = args.variant
    bb = load_backbone(args.model, device=args.device, threads=args.threads)
    model = bb.model
    tok, batch = _batch(bb, args.pairs, args.max_length)
    batch = {k: t.to(args.device) for k, t in batch.items()}
    B = len(tok)
    param_bytes = _bytes(model.parameters())
    out = {"variant": v, "pairs": B, "tokens": int(batch["attention_mask"].sum()), "seq_len": int(batch["input_ids"].shape[1]),
           "model_param_mib": param_bytes / MiB}
    cuda = args.device.startswith("cuda")
    ref_file = Path(args.workdir) / "ref.safetensors"
    t0 = time.time()

    if v == "load":
        with torch.no_grad():
            forward_logps(model, batch)
    elif v == "precompute":
        from safetensors.torch import save_file

        sae = _sae(args, bb.hidden_size)
        with torch.no_grad():
            ref = forward_logps(model, batch)
        chosen, rejected = precompute_ref_features(bb, tok, sae, args.layer, batch_size=B, progress=False)
        save_file({"logps": ref.logps.float().cpu().contiguous(), "chosen": chosen, "rejected": rejected}, str(ref_file))
        out["ref_cache_mib"] = ref_file.stat().st_size / MiB
    else:
        lora = v.endswith("lora")
        if lora:
            model = _lora(model)
        else:
            model.requires_grad_(True)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-6)
        ref_model = None
        sae = None
        extra_bytes = 0
        if v == "dpo_full":
            ref_model = copy.deepcopy(bb.model).eval().requires_grad_(False)  # the in-memory reference copy
            extra_bytes = _bytes(ref_model.parameters())
            out["reference_copy_mib"] = extra_bytes / MiB
        if v.startswith("fpo"):
            from safetensors.torch import load_file

            sae = _sae(args, bb.hidden_size).to(args.device)
            cache = {k: t.to(args.device) for k, t in load_file(str(ref_file)).items()}
            out["sae_mib"] = _bytes(sae.parameters()) / MiB
            out["d_sae"] = sae.d_sae
            out["ref_cache_in_memory_mib"] = _bytes(cache.values()) / MiB
            extra_bytes = _bytes(sae.parameters()) + _bytes(cache.values())
        step_times = []
        for _step in range(args.steps):
            ts = time.time()
            opt.zero_grad(set_to_none=True)
            if v.startswith("dpo"):
                pol = forward_logps(model, batch)
                with torch.no_grad():
                    if lora:
                        with model.disable_adapter():
                            ref = forward_logps(model, batch)
                    else:
                        ref = forward_logps(ref_model, batch)
                lo = dpo(pol.logps[:B], pol.logps[B:], ref.logps[:B], ref.logps[B:], beta=0.1)
            else:
                pol = forward_logps(model, batch, capture_layers=[args.layer])
                feats = pool_answer_features(pol.captured[args.layer], batch["answer_mask"], sae)  # [2B, d_sae]
                n = pol.lengths
                lo = fpo(pol.logps[:B], pol.logps[B:], cache["logps"][:B], cache["logps"][B:],
                                   chosen_lengths=n[:B], rejected_lengths=n[B:],
                                   policy_chosen_features=feats[:B], policy_rejected_features=feats[B:],
                                   ref_chosen_features=cache["chosen"], ref_rejected_features=cache["rejected"],
                                   beta=0.1, alpha=0.5, top_k=50)
            lo.losses.mean().backward()
            opt.step()
            if cuda:
                torch.cuda.synchronize()
            step_times.append(time.time() - ts)
        out["loss_first_step"] = float(lo.losses.mean())
        out["step_seconds"] = step_times
        out["trainable_mib"] = _bytes(trainable) / MiB
        out["grad_mib"] = _bytes(p.grad for p in trainable if p.grad is not None) / MiB
        out["optimizer_state_mib"] = _opt_state_bytes(opt) / MiB
        out["extra_resident_mib"] = extra_bytes / MiB
        # Tensors a step keeps alive besides activations: model (+ LoRA), grads, AdamW moments, ref copy / SAE + cache.
        out["tensor_total_mib"] = (_bytes(model.parameters()) + _bytes(p.grad for p in trainable if p.grad is not None)
                                   + _opt_state_bytes(opt) + extra_bytes) / MiB
    out["seconds"] = time.time() - t0
    out["rss_now_mib"] = _rss_now_mib()
    out["peak_rss_mib"] = _peak_rss_mib()
    if cuda:
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / MiB
    return out


def _run_child(args, variant: str, workdir: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--variant", variant, "--workdir", workdir, "--pairs", str(args.pairs),
           "--max-length", str(args.max_length), "--layer", str(args.layer), "--steps", str(args.steps),
           "--device", args.device]
    if args.sae:
        cmd += ["--sae", args.sae]
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print(f"[fpo_memory] {variant} ...", file=sys.stderr, flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if res.returncode != 0:
        raise SystemExit(f"variant {variant} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _env(args) -> dict:
    dev = args.device
    if dev.startswith("cuda"):
        dev = f"{dev} ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else dev
    return {"date": time.strftime("%Y-%m-%d"), "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "device": dev}


def _section(run: dict) -> list[str]:
    """Markdown for one measured run (one device)."""
    results, a, env = run["results"], run["args"], run["env"]

    def f(x, nd=0):
        return "-" if x is None else f"{x:,.{nd}f}"

    cuda = any("cuda_max_allocated_mib" in r for r in results.values())
    rows = []
    for v in VARIANTS:
        r = results.get(v)
        if r is None:
            continue
        st = r.get("step_seconds") or []
        rows.append(
            f"| {v} | {f(r['peak_rss_mib'])} |" + (f" {f(r.get('cuda_max_allocated_mib'))} |" if cuda else "")
            + f" {f(r.get('trainable_mib'), 1)} | {f(r.get('grad_mib'), 1)} | {f(r.get('optimizer_state_mib'), 1)} |"
            f" {f(r.get('reference_copy_mib'))} | {f(r.get('sae_mib'), 1)} | {f(r.get('ref_cache_in_memory_mib'), 3)} |"
            f" {f(r.get('tensor_total_mib'))} | {f(st[-1], 3 if cuda else 2) if st else '-'} |"
        )
    any_r = next(iter(results.values()))
    d, fp = results.get("dpo_full"), results.get("fpo_full")
    dl, fl = results.get("dpo_lora"), results.get("fpo_lora")
    pre, base = results.get("precompute"), results.get("load")
    lines = [
        f"## {env['device']}",
        "",
        f"Measured on {env['date']}: {env['platform']}, {env['cpu']}, {env['cpus']} CPUs visible, torch {env['torch']}, "
        f"device `{env['device']}`. Model: SmolLM2-135M-Instruct in float32 ({f(any_r['model_param_mib'])} MiB of "
        f"parameters). Batch: {any_r['pairs']} hh-rlhf pairs ({2 * any_r['pairs']} sequences, padded length "
        f"{any_r['seq_len']}, {any_r['tokens']} real tokens). SAE: layer {a['layer']}, "
        f"{'from ' + a['sae'] if a.get('sae') else 'random top-k, d_sae = 4608, k = 32'}. AdamW, {a['steps']} steps "
        "per variant, each variant in a fresh process."
        + (f" Command: `{env['command']}` on commit `{env['commit']}`." if env.get("command") else ""),
        "",
        "| variant | peak RSS MiB |" + (" CUDA max allocated MiB |" if cuda else "")
        + " trainable MiB | grads MiB | AdamW state MiB | reference copy MiB | SAE MiB | cached ref feats MiB |"
        " all tensors MiB | step s (last) |",
        "|---|---|" + ("---|" if cuda else "") + "---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    if d and fp:
        key, what = ("cuda_max_allocated_mib", "CUDA max allocated") if cuda else ("peak_rss_mib", "RSS")
        lines.append(
            f"- Full-parameter training: DPO's step peaked at {f(d[key])} MiB {what}, FPO's at {f(fp[key])} MiB: "
            f"{_less_or_more(d[key] - fp[key], 'MiB', 'FPO')} (the tensor counts predict "
            f"{f(d['reference_copy_mib'] - fp['sae_mib'] - fp['ref_cache_in_memory_mib'])} MiB: reference copy minus "
            "SAE and cached batch). The reference copy alone is "
            f"{f(d['reference_copy_mib'])} MiB of "
            f"tensors; FPO replaces it with the SAE ({f(fp['sae_mib'], 1)} MiB, frozen: no gradients, no optimiser "
            f"state) and the cached reference numbers of the batch ({f(fp['ref_cache_in_memory_mib'], 3)} MiB: one "
            f"log-prob and one {fp['d_sae']}-wide pooled feature vector per answer)."
        )
    if dl and fl:
        key = "cuda_max_allocated_mib" if cuda else "peak_rss_mib"
        lines.append(
            f"- LoRA: the reference is the same weights with the adapter switched off, so DPO keeps no copy either: "
            f"DPO-LoRA peaked at {f(dl[key])} MiB and FPO-LoRA at {f(fl[key])} MiB ({'CUDA' if cuda else 'RSS'}). "
            f"DPO-LoRA runs a reference forward every step and FPO-LoRA does not; measured last step "
            f"{f(dl['step_seconds'][-1], 3)} s vs {f(fl['step_seconds'][-1], 3)} s: "
            f"{_less_or_more(dl['step_seconds'][-1] - fl['step_seconds'][-1], 's', 'FPO-LoRA', 3)}. FPO carries the SAE "
            f"instead ({f(fl['sae_mib'], 1)} MiB)."
        )
    if pre:
        lines.append(
            f"- The offline pass FPO needs once (reference log-probs + pooled SAE features of the batch) took "
            f"{f(pre['seconds'], 1)} s (model load excluded) and peaked at {f(pre['peak_rss_mib'])} MiB RSS; its file "
            f"holds {f(pre['ref_cache_mib'], 3)} MiB for {pre['pairs']} pairs (float32: 2 x 4608 x 4 B = 36 KiB per "
            "pair, about 360 MiB per 10k pairs)."
        )
    if base:
        lines.append(f"- Floor: loading the model and one no-grad forward peaked at {f(base['peak_rss_mib'])} MiB RSS"
                     + (f", {f(base['cuda_max_allocated_mib'])} MiB CUDA." if cuda else "."))
    lines.append("")
    return lines


def _less_or_more(diff: float, unit: str, who: str, digits: int = 0) -> str:
    """'X unit less for WHO' or 'X unit more for WHO': the sentence follows the sign of the measured numbers."""
    word = "less" if diff >= 0 else "more"
    return f"{abs(diff):.{digits}f} {unit} {word} for {who}"


def _report(runs: dict, path: Path) -> None:
    lines = [
        "# FPO memory: a training step without a reference model vs DPO with one",
        "",
        "Written by `benchmarks/fpo_memory.py` (each variant in a fresh process; see its docstring). FPO reads",
        "the reference log-probs and pooled SAE features from an offline cache; DPO-full keeps a frozen deep copy",
        "of the model; the LoRA variants use the adapter-disabled model as DPO's reference.",
        "",
    ]
    for label in sorted(runs, key=lambda k: (k != "cpu", k)):
        lines += _section(runs[label])
    lines += [
        "## Reading the numbers",
        "",
        "- Peak RSS includes the Python/torch runtime, the tokenizer, the data and allocator caches, so it is not the",
        "  sum of the tensor columns; the tensor columns are exact byte counts. Batches here are small, so the",
        "  differences between variants come from resident tensors. With larger batches DPO-full also pays the",
        "  reference forward's (no-grad, short-lived) activations, while FPO keeps the SAE encoding of the answer",
        "  tokens ([answer tokens, 4608] floats) for backward.",
        "- Step times are the wall clock of each variant's last step. On the CPU machine (2 cores shared with other",
        "  jobs) they are indicative only; peak RSS and tensor bytes do not depend on load.",
        "",
        "Raw figures: `fpo_memory.json` beside this file.",
    ]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--layer", type=int, default=24)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--sae", default=None)
    ap.add_argument("--model", default=None, help="backbone spec (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "reports" / "fpo_memory.md"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    wanted = [v for v in args.variants.split(",") if v]
    unknown = set(wanted) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}; choose from {VARIANTS}")
    if any(v.startswith("fpo") for v in wanted) and "precompute" not in wanted:
        wanted.insert(0, "precompute")
    if "load" not in wanted:
        wanted.insert(0, "load")
    results = {}
    env = {**_env(args), "commit": git_commit(), "command": " ".join(["python benchmarks/fpo_memory.py", *sys.argv[1:]])}
    with tempfile.TemporaryDirectory(prefix="fpo-mem-") as work:
        for v in [v for v in VARIANTS if v in wanted]:
            results[v] = _run_child(args, v, work)
            r = results[v]
            print(f"[fpo_memory] {v}: peak RSS {r['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    js = out.with_suffix(".json")
    runs = json.loads(js.read_text()).get("runs", {}) if js.is_file() else {}
    keep = {k: v for k, v in vars(args).items() if k not in ("child", "variant", "workdir", "out")}
    runs[args.device.split(":")[0]] = {"args": keep, "env": env, "results": results}
    js.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    _report(runs, out)
    print(out.read_text())


if __name__ == "__main__":
    main()
