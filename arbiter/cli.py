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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: arbiter {serve,serve-ray,train,eval} ...\n\n  serve      start the server\n"
             "  serve-ray  start replicas under Ray Serve\n  train      train heads, adapters, SAEs\n"
             "  eval       evaluate heads and adapters\n")
    if not argv or argv[0] in {"-h", "--help"}:
        print(usage)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        return serve(rest)
    if cmd == "serve-ray":
        return serve_ray(rest)
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
