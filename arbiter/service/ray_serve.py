"""Arbiter as replicas under Ray Serve (``pip install 'arbiter[ray]'``): one replica per device, the FastAPI app as
ingress, every replica with its own model, worker and heads registry.

Heads and adapters: replicas share one heads directory and follow it (``ARBITER_HEADS_WATCH_S``, set to 2 s here
unless given), so a head added, replaced or removed on disk reaches every replica without an admin call having
to reach each of them (an admin call through the Serve router lands on one replica only).

    from arbiter.service.ray_serve import deployment
    serve.run(deployment(num_replicas=2, env={"ARBITER_HEADS_DIR": "/shared/heads"}))

or ``arbiter serve-ray --replicas 2`` (README, "Scale-out"). On GPUs give each replica one device with
``ray_actor_options={"num_gpus": 1}`` (and ``ARBITER_ENGINE=vllm``; tensor parallelism for large models is vLLM's
``tensor_parallel_size`` inside one replica).
"""

from __future__ import annotations

import os
from typing import Any

# Settings the replicas read from their environment (ARBITER_*), passed through Ray's runtime_env (replica_env).
DEFAULT_WATCH_S = "2"


def deployment(num_replicas: int = 2, *, env: dict[str, str] | None = None, ray_actor_options: dict[str, Any] | None = None,
               name: str = "arbiter") -> Any:
    """A bound Ray Serve application: ``num_replicas`` replicas of the Arbiter app."""
    from ray import serve


    env_vars = replica_env(env)
    opts = {"num_cpus": 0.5, **(ray_actor_options or {})}
    opts["runtime_env"] = {**opts.get("runtime_env", {}), "env_vars": {**env_vars, "PYTHONUNBUFFERED": "1"}}

    @serve.deployment(name=name, num_replicas=num_replicas, ray_actor_options=opts,
                      health_check_period_s=5, health_check_timeout_s=30)
    @serve.ingress(_build_app)  # evaluated in each replica: its own settings (from env_vars), model and worker
    class Arbiter:
        def check_health(self) -> None:
            """Ray's replica health check: a replica whose engine worker died is restarted by Serve."""
            st = _APP["app"].state.arbiter if "app" in _APP else None
            if st is not None and st.worker is not None and not st.worker.alive:
                raise RuntimeError("the engine worker is not running")

    return Arbiter.bind()  # type: ignore[attr-defined]  # added by @serve.deployment


SECRET_SETTINGS = ("ARBITER_API_KEY", "ARBITER_ADMIN_KEY")


def replica_env(env: dict[str, str] | None = None, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The ARBITER_* settings the replicas get through Ray's runtime environment: this process's, updated by ``env``.

    Never the keys themselves: a runtime environment is readable by anyone who can reach the cluster (its
    dashboard, job and state APIs). Keys go by reference, ARBITER_API_KEY_FILE / ARBITER_ADMIN_KEY_FILE naming a
    file every node can read (a secret mount); a key given by value is refused with that advice."""
    src = os.environ if environ is None else environ
    out = {k: v for k, v in src.items() if k.startswith("ARBITER_")}
    out.update(env or {})
    given = [k for k in SECRET_SETTINGS if out.get(k, "").strip()]
    if given:
        raise ValueError(f"{', '.join(given)} would be copied into Ray's runtime environment, which anyone who can "
                         f"reach the cluster can read: pass {', '.join(k + '_FILE' for k in given)} (a file on every "
                         "node, e.g. a secret mount) instead")
    for k in SECRET_SETTINGS:
        out.pop(k, None)
    out.setdefault("ARBITER_HEADS_WATCH_S", DEFAULT_WATCH_S)
    return out


_APP: dict[str, Any] = {}


def _build_app() -> Any:
    from .app import create_app

    _APP["app"] = create_app(exit_on_engine_death=False)  # the lifespan loads the model in the background
    return _APP["app"]
