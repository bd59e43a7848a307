"""The ``arbiter`` console script: ``arbiter serve``, ``arbiter train ...``, ``arbiter eval ...``.

Sub-commands import their half lazily, so ``arbiter serve`` never loads the training code.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(time.time(), 3), "level": record.levelname.lower(), "logger": record.name}
        msg = record.getMessage()
        try:
            parsed = json.loads(msg) if msg.startswith("{") else None
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            out.update(parsed)
        else:
            out["msg"] = msg
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def serve(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="arbiter serve", description=(
        "Start the OpenAI-compatible server. Every setting is an ARBITER_* environment variable "
        "(see the README); the flags below override the most common ones."))
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--model", help="embedded default, a local HF model directory, or a GGUF file")
    p.add_argument("--heads-dir")
    p.add_argument("--engine", choices=["hf", "vllm"])
    args = p.parse_args(argv)

    import uvicorn

    from arbiter.service.app import create_app
    from arbiter.service.settings import Settings

    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**overrides)
    except Exception as e:
        print(f"arbiter serve: invalid settings: {e}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                                           access_log=False, timeout_graceful_shutdown=30))
    # The engine worker's death handler stops this server (in-flight requests get 503s), and the process
    # then exits non-zero so a supervisor (systemd Restart=on-failure, Docker, k8s) restarts it.
    app.state.server = server
    # uvicorn handles SIGTERM by draining, then re-raises the signal once it has stopped, so a drained stop
    # would end "terminated by SIGTERM". A drained stop is a clean exit: take the re-raised signal here and
    # return 0 (or 3 after an engine death).
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return int(getattr(app.state, "exit_code", 0))


def serve_ray(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="arbiter serve-ray", description=(
        "Run Arbiter as replicas under Ray Serve on a local or existing Ray cluster (pip install 'arbiter[ray]'). "
        "Replica settings are ARBITER_* environment variables; the replicas follow the shared heads directory."))
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="e.g. 1 for one GPU per replica")
    p.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    args = p.parse_args(argv)
    try:
        import ray
        from ray import serve
    except ImportError as e:
        print(f"arbiter serve-ray needs Ray Serve: pip install -e '.[ray]' ({e})", file=sys.stderr)
        return 2
    from arbiter.service.ray_serve import deployment, replica_env

    try:
        replica_env()  # refuses keys given by value before a cluster starts
    except ValueError as e:
        print(f"arbiter serve-ray: {e}", file=sys.stderr)
        return 2
    setup_logging("info")
    ray.init(address=args.address, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    opts = {"num_gpus": args.gpus_per_replica} if args.gpus_per_replica else None
    serve.run(deployment(num_replicas=args.replicas, ray_actor_options=opts), name="arbiter", route_prefix="/")
    logging.getLogger("arbiter").info("serving %d replicas on http://%s:%d", args.replicas, args.host, args.port)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        while not stop["now"]:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    ray.shutdown()
    return 0


def heads(argv: list[str]) -> int:
    """``arbiter heads {list,show,card}``: the heads a server loads, a head's model card, (re)writing a card."""
    import argparse
    import json
    import os
    from pathlib import Path

    p = argparse.ArgumentParser(prog="arbiter heads", description="Inspect heads and their model cards.")
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="the heads a server loads: a running server's (--url), else a heads directory")
    ls.add_argument("--heads-dir", default=None, help="default: ARBITER_HEADS_DIR, else ./heads")
    ls.add_argument("--url", default=None, help="a running server, e.g. http://127.0.0.1:8000 (GET /v1/heads)")
    ls.add_argument("--api-key", default=os.environ.get("ARBITER_API_KEY"), help="default: ARBITER_API_KEY")
    sh = sub.add_parser("show", help="print a head's model card (README.md; rendered from its config if absent)")
    sh.add_argument("dir")
    cd = sub.add_parser("card", help="(re)write a head's README.md model card from its head_config.json")
    cd.add_argument("dir")
    cd.add_argument("--e2e", default=None, metavar="JSON", help="a benchmark report (bestofn_api.json) with this head's "
                                                                "end-to-end rows")
    cd.add_argument("--plots", default=None, metavar="DIR", help="a directory whose report.md and PNGs the card links")
    cd.add_argument("--command", default=None, help="the command that made the head, if its provenance lacks one")
    args = p.parse_args(argv)
    from arbiter.heads import HeadLoadError
    from arbiter.heads.card import CARD_FILE, render_card, write_card
    from arbiter.heads.io import read_config

    try:
        if args.cmd == "show":
            card = Path(args.dir) / CARD_FILE
            print(card.read_text() if card.is_file() else render_card(read_config(args.dir), args.dir), end="")
            return 0
        if args.cmd == "card":
            report = json.loads(Path(args.e2e).read_text()) if args.e2e else None
            print(write_card(args.dir, report=report, source=args.e2e, plots_dir=args.plots,
                             command=args.command))
            return 0
        if args.url:
            import httpx

            h = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
            r = httpx.get(args.url.rstrip("/") + "/v1/heads", headers=h, timeout=30)
            if r.status_code != 200:
                print(f"arbiter heads list: {r.status_code} {r.text[:300]}", file=sys.stderr)
                return 1
            rows = [(c["id"], str(c.get("layer")), str(c.get("pooler")),
                     (c.get("selection") or {}).get("select", "argmax"), "loaded") for c in r.json()["data"]]
        else:
            root = Path(args.heads_dir or os.environ.get("ARBITER_HEADS_DIR") or "heads")
            rows = []
            for d in sorted(x for x in root.iterdir() if x.is_dir() and not x.name.startswith(".")) if root.is_dir() else []:
                try:
                    c = read_config(d)
                except HeadLoadError as e:
                    rows.append((d.name, "-", "-", "-", f"not loadable: {e}"))
                    continue
                m = (c.provenance or {}).get("metrics", {})
                acc = m.get("test_accuracy", m.get("test_pair_accuracy"))
                rows.append((c.name, str(c.layer), c.pooler, c.selection.select if c.selection else "argmax",
                             f"test accuracy {acc:.3f}" if isinstance(acc, float) else "-"))
        print(f"{'head':<20} {'layer':>5}  {'pooler':<12} {'rule':<14} notes")
        for name, layer, pooler, rule, note in rows:
            print(f"{name:<20} {layer:>5}  {pooler:<12} {rule:<14} {note}")
        return 0
    except (HeadLoadError, OSError, ValueError) as e:
        print(f"arbiter heads {args.cmd}: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: arbiter {serve,serve-ray,train,eval,heads} ...\n\n  serve      start the server\n"
             "  serve-ray  start replicas under Ray Serve\n  train      train heads, adapters, SAEs\n"
             "  eval       evaluate heads and adapters\n  heads      list heads, show or write their model cards\n")
    if not argv or argv[0] in {"-h", "--help"}:
        print(usage)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        return serve(rest)
    if cmd == "serve-ray":
        return serve_ray(rest)
    if cmd == "heads":
        return heads(rest)
    if cmd in {"train", "eval"}:
        try:
            from arbiter.training import cli as tcli
        except ImportError as e:
            print(f"arbiter {cmd} needs the training extras: pip install -e '.[train]' ({e})", file=sys.stderr)
            return 2
        setup_logging("info")
        return int((tcli.main if cmd == "train" else tcli.eval_main)(rest) or 0)
    if cmd == "--version":
        from arbiter import __version__

        print(__version__)
        return 0
    print(f"arbiter: unknown command {cmd!r}\n\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
