"""``arbiter train <recipe>`` and ``arbiter eval <task>``: argument parsing and lazy dispatch.

    arbiter train {head,joint,adapter,sae,ref} [--config X.yaml] [key=value ...] [--resume] [--out DIR]
    arbiter eval {pairs,choice,bestofn} --head DIR --data SRC [--out DIR] ...

The top-level console script (``arbiter.cli``) calls :func:`main` / :func:`eval_main` with the arguments after
the subcommand. Both return 0 on success and raise ``SystemExit`` with a non-zero code otherwise:
2 for a usage, config or data error (always before any model loads when it can be known then),
1 for a failure during the run, 130 on Ctrl-C. ``ARBITER_DEBUG=1`` prints tracebacks.

Recipe protocol (one module per recipe under ``arbiter.training.recipes``, imported only when chosen, so
``--help`` and config errors stay fast and a missing optional dependency only breaks its own recipe):

- ``CONFIG``: the recipe's config dataclass. It is filled by ``arbiter.training.config.load_config`` from
  the YAML file (``--config``; a bare name like ``head_helpful`` means ``arbiter/training/configs/<name>.yaml``)
  and the ``key=value`` overrides (dotted keys for nested sections), type-checked and ``validate()``-d
  before anything heavy happens. It must have an ``out: str`` field (the run directory); ``--out DIR`` is the
  override ``out=DIR``.
- ``run(cfg, *, resume: bool) -> dict``: trains and writes the artifacts; returns the final metrics (printed
  as JSON). ``resume=True`` continues from the latest checkpoint under ``cfg.out``.
- optional ``add_arguments(parser)``: extra ``--options``; each one given on the command line becomes the
  config override ``<dest>=<value>`` (so an option is only a shortcut for a config key).
- optional ``DESCRIPTION``: one line for ``--help`` (else the module docstring's first line).
Errors a recipe raises: ``ConfigError``/``DataError`` (-> exit 2), anything else (-> exit 1 with the message).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence

# name -> (module, one-line description). Modules are imported only when their recipe is chosen.
RECIPES: dict[str, tuple[str, str]] = {
    "head": ("arbiter.training.recipes.head", "train a DPH reward head on a frozen backbone (cached features)"),
    "verifier": ("arbiter.training.recipes.verifier", "train a verifier head on the model's own samples, with its "
                                                      "selection rule"),
    "joint": ("arbiter.training.recipes.joint", "joint cDPO + DPH training (LoRA adapter and head together)"),
    "adapter": ("arbiter.training.recipes.adapter", "align a LoRA adapter: DPO, cDPO, IPO, SimPO, MIPO, FPO, "
                "intermediate DPO"),
    "ref": ("arbiter.training.recipes.ref", "precompute reference log-probs (and SAE features) offline"),
    "sae": ("arbiter.training.recipes.sae", "train a top-k sparse autoencoder on one layer's activations (FPO)"),
}
EVAL_TASKS = {
    "pairs": "reward accuracy on preference pairs (share with r_w > r_l, mean margin)",
    "choice": "multiple-choice accuracy: pick by head reward vs by the LM's average answer log-prob",
    "bestofn": "best-of-N on math: pass@1, head pick, reward-weighted vote, majority vote, oracle pass@N",
}
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
EXIT_USAGE, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130


class CLIError(Exception):
    """A usage error reported as ``<prog>: error: <message>`` with exit code 2."""


def _debug() -> bool:
    return os.environ.get("ARBITER_DEBUG", "").lower() in {"1", "true", "yes"}


def _fail(prog: str, message: str, code: int) -> typing.NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def resolve_config_path(spec: str | None) -> str | None:
    """A YAML path as given, or a packaged config by bare name (``head_helpful`` -> configs/head_helpful.yaml)."""
    if not spec:
        return None
    p = Path(spec)
    if p.exists():
        return str(p)
    for cand in (CONFIG_DIR / spec, CONFIG_DIR / f"{spec}.yaml"):
        if cand.is_file():
            return str(cand)
    packaged = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
    raise CLIError(f"config file {spec!r} does not exist (packaged configs: {', '.join(packaged) or 'none'})")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def config_help(cls: type, prefix: str = "") -> list[str]:
    """One line per config field (dotted for nested dataclasses): name, type, default."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            lines += config_help(tp, f"{prefix}{f.name}.")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        lines.append(f"  {prefix}{f.name} ({_type_name(tp)}) = {default!r}")
    return lines


def _import_recipe(name: str):
    module_name, _ = RECIPES[name]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            raise CLIError(f"recipe {name!r} is not available in this installation ({module_name} is missing)") from None
        raise CLIError(
            f"recipe {name!r} needs the package {e.name!r}, which is not installed "
            "(pip install 'arbiter[train]')"
        ) from None


def _train_overview() -> str:
    lines = ["recipes:"]
    lines += [f"  {name:<8} {desc}" for name, (_, desc) in RECIPES.items()]
    lines += [
        "",
        "Run `arbiter train <recipe> --help` for a recipe's options and every config key with its default.",
        "Config: --config FILE.yaml (or a packaged name: " + ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
        + "), then key=value overrides (dotted for nested keys, values parsed as YAML).",
        "Exit codes: 0 ok, 2 usage/config/data error (before any model loads), 1 run failure, 130 interrupted.",
    ]
    return "\n".join(lines)


def _recipe_parser(name: str, module: Any) -> argparse.ArgumentParser:
    config_cls = getattr(module, "CONFIG", None)
    if not isinstance(config_cls, type) or not dataclasses.is_dataclass(config_cls) or not callable(getattr(module, "run", None)):
        raise CLIError(f"recipe module {module.__name__} does not follow the recipe protocol (CONFIG dataclass + run)")
    desc = getattr(module, "DESCRIPTION", None) or (module.__doc__ or RECIPES[name][1]).strip().splitlines()[0]
    epilog = "config keys (override with key=value):\n" + "\n".join(config_help(config_cls))
    p = argparse.ArgumentParser(
        prog=f"arbiter train {name}", description=desc, epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="YAML config (path, or a packaged config name)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint under the run's out dir")
    p.add_argument("--out", metavar="DIR", help="run directory (the config key 'out')")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. lr=1e-3 epochs=5")
    adder = getattr(module, "add_arguments", None)
    if callable(adder):
        group = p.add_argument_group(f"{name} options (shortcuts for config keys)")
        adder(group)
    return p


def _extra_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """Recipe-defined options given on the command line -> ``dest=value`` overrides (JSON is valid YAML)."""
    base = {"config", "resume", "out", "overrides", "help"}
    out = []
    for action in parser._actions:
        if action.dest in base or action.dest == argparse.SUPPRESS:
            continue
        value = getattr(args, action.dest, None)
        if value is not None:
            out.append(f"{action.dest}={json.dumps(value)}")
    return out


def load_recipe_config(name: str, argv: Sequence[str]) -> tuple[Any, Any, argparse.Namespace]:
    """(recipe module, validated config, parsed args) for ``arbiter train <name> <argv>``; raises on errors."""
    from .config import ConfigError, load_config

    module = _import_recipe(name)
    parser = _recipe_parser(name, module)
    args = parser.parse_intermixed_args(list(argv))
    overrides = list(args.overrides) + _extra_overrides(parser, args)
    if args.out is not None:
        overrides.append(f"out={json.dumps(args.out)}")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"unexpected argument(s) {bad}: overrides look like key=value")
    cfg = load_config(module.CONFIG, resolve_config_path(args.config), overrides)
    return module, cfg, args


def main(argv: Sequence[str] | None = None) -> int:
    """``arbiter train ...``. Returns 0; raises SystemExit(2|1|130) on failure."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from arbiter.training.artifacts import set_command

    set_command(["arbiter", "train", *argv])
    prog = "arbiter train"
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {prog} {{{','.join(RECIPES)}}} [--config FILE] [key=value ...] [--resume] [--out DIR]\n")
        print("Train reward heads, aligned adapters and sparse autoencoders.\n")
        print(_train_overview())
        if not argv:
            raise SystemExit(EXIT_USAGE)
        return 0
    name = argv[0]
    if name not in RECIPES:
        _fail(prog, f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}", EXIT_USAGE)

    from .config import ConfigError

    try:
        module, cfg, args = load_recipe_config(name, argv[1:])
    except (CLIError, ConfigError, ValueError) as e:  # DataError is a ValueError
        _fail(f"{prog} {name}", f"config error: {e}" if isinstance(e, ConfigError) else str(e), EXIT_USAGE)
    return _run_guarded(f"{prog} {name}", lambda: module.run(cfg, resume=bool(args.resume)))


def _run_guarded(prog: str, fn) -> int:
    from arbiter.heads import HeadLoadError

    from .config import ConfigError
    from .data import DataError

    try:
        result = fn()
    except KeyboardInterrupt:
        _fail(prog, "interrupted (a run with checkpoints continues with --resume)", EXIT_INTERRUPTED)
    except (ConfigError, DataError, HeadLoadError) as e:  # the user's input is wrong, not the program
        if _debug():
            raise
        _fail(prog, str(e), EXIT_USAGE)
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence: one clear line, no traceback
        if _debug():
            raise
        _fail(prog, f"{type(e).__name__}: {e} (set ARBITER_DEBUG=1 for a traceback)", EXIT_FAILURE)
    if isinstance(result, dict):
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0


# --------------------------------------------------------------------------------------------------
# arbiter eval
# --------------------------------------------------------------------------------------------------


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="arbiter eval",
        description="Evaluate a reward head; each task writes <out>/<task>.json and <out>/<task>.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="tasks:\n" + "\n".join(f"  {k:<8} {v}" for k, v in EVAL_TASKS.items()),
    )
    sub = p.add_subparsers(dest="task", metavar="TASK", required=True)

    def common(sp: argparse.ArgumentParser, data_help: str) -> None:
        sp.add_argument("--head", required=True, metavar="DIR", help="head directory (head_config.json + head.safetensors)")
        sp.add_argument("--data", required=True, metavar="SRC", help=data_help)
        sp.add_argument("--limit", type=int, default=None, help="first N items after a seeded shuffle")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--out", default=None, metavar="DIR", help="report directory (default runs/eval/<head name>)")
        sp.add_argument("--model", default=None, help="backbone (default: the embedded SmolLM2-135M-Instruct)")
        sp.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per forward pass")
        sp.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="backbone dtype (auto, as the server: bfloat16 only where this CPU multiplies it "
                             "natively and faster, float32 otherwise)")

    sp = sub.add_parser("pairs", help=EVAL_TASKS["pairs"], description=EVAL_TASKS["pairs"])
    common(sp, "preference pairs: a .jsonl/.json/.parquet file or a builtin (hh-rlhf, hh-rlhf/harmless-base, "
               "pandalm, commonsense_qa, ...)")
    sp.add_argument("--max-length", type=int, default=1024, help="drop (count) pairs longer than this")
    sp.add_argument("--truncate-prompt", action="store_true", help="left-truncate long prompts instead of dropping")
    sp.add_argument("--cache-dir", default=None, help="feature cache directory (default ~/.cache/arbiter/features)")
    sp = sub.add_parser("choice", help=EVAL_TASKS["choice"], description=EVAL_TASKS["choice"])
    common(sp, 'multiple-choice builtin (commonsense_qa, arc_challenge, openbookqa, sst2/dev, sst2) or a .jsonl file '
               'of {"question": str, "choices": [str, ...], "answer": index | option text | letter}')
    sp = sub.add_parser("bestofn", help=EVAL_TASKS["bestofn"], description=EVAL_TASKS["bestofn"])
    common(sp, 'math builtin (gsm8k, svamp) or a .jsonl file of {"question": str, "answer": number}')
    sp.add_argument("--n", type=int, default=8, help="samples per question")
    sp.add_argument("--max-new-tokens", type=int, default=256)
    sp.add_argument("--temperature", type=float, default=0.7)
    sp.add_argument("--top-p", type=float, default=1.0)
    sp.add_argument("--gen-batch", type=int, default=4, help="questions per generate() call (x n sequences)")
    return p


def _check_eval_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before the model loads: the head's config and the data source."""
    from arbiter.heads import HeadLoadError, read_config

    from . import data

    try:
        read_config(args.head)
    except (HeadLoadError, OSError) as e:
        raise CLIError(f"--head: {e}") from None
    if args.limit is not None and args.limit < 1:
        raise CLIError("--limit must be >= 1")
    if args.task == "pairs":
        if args.data not in data.PAIR_BUILTINS and not Path(args.data).expanduser().is_file():
            raise CLIError(f"--data {args.data!r} is neither a file nor a builtin ({', '.join(data.PAIR_BUILTINS)})")
        if args.max_length < 2:
            raise CLIError("--max-length must be >= 2")
    elif args.task == "choice":
        if args.data not in data.CHOICE_BUILTINS and not Path(args.data).expanduser().is_file():
            raise CLIError(f"--data {args.data!r} is neither a multiple-choice builtin ({', '.join(data.CHOICE_BUILTINS)}) "
                           'nor a .jsonl file of {"question", "choices", "answer"}')
    elif args.task == "bestofn":
        if args.data not in data.MATH_BUILTINS and not Path(args.data).expanduser().is_file():
            raise CLIError(f"--data {args.data!r} is neither a math builtin ({', '.join(data.MATH_BUILTINS)}) "
                           'nor a .jsonl file of {"question", "answer"}')
        if args.n < 1 or args.max_new_tokens < 1 or args.gen_batch < 1:
            raise CLIError("--n, --max-new-tokens and --gen-batch must be >= 1")
        if not args.temperature > 0 or not 0 < args.top_p <= 1:
            raise CLIError("--temperature must be > 0 and --top-p in (0, 1]")
    if args.batch_tokens < 16:
        raise CLIError("--batch-tokens must be >= 16")


def eval_main(argv: Sequence[str] | None = None) -> int:
    """``arbiter eval ...``. Returns 0; raises SystemExit(2|1|130) on failure."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _eval_parser()
    args = parser.parse_args(argv)
    prog = f"arbiter eval {args.task}"
    try:
        _check_eval_args(args)
    except CLIError as e:
        _fail(prog, str(e), EXIT_USAGE)

    def go() -> dict:
        from . import evaluate

        kw = {k: v for k, v in vars(args).items() if k != "task"}
        report = getattr(evaluate, f"eval_{args.task}")(**kw)
        print(evaluate.markdown(report))
        return {"json": report.get("paths", {}).get("json"), "markdown": report.get("paths", {}).get("markdown")}

    return _run_guarded(prog, go)


def _module_main(argv: Sequence[str] | None = None) -> int:
    """``python -m arbiter.training.cli {train,eval} ...`` (the same as the console script's subcommands)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "eval":
        return eval_main(argv[1:])
    if argv and argv[0] == "train":
        return main(argv[1:])
    print("usage: python -m arbiter.training.cli {train,eval} ...", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


if __name__ == "__main__":
    sys.exit(_module_main())
