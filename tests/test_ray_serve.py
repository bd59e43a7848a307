"""Scale-out under Ray Serve: a local Ray cluster on this CPU machine runs 2 replicas of the embedded model behind
one address (``arbiter.service.ray_serve.deployment``). Requests spread over both, a head written to the shared
heads directory reaches both, and after one replica is killed every request is still answered."""

from __future__ import annotations

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from arbiter.testing.fakes import free_port, save_random_head  # noqa: E402
from arbiter.testing.served import wait_until  # noqa: E402


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, backbone):
    from arbiter.service.ray_serve import deployment

    heads = tmp_path_factory.mktemp("shared_heads")
    save_random_head(backbone.fingerprint, heads / "h1", name="h1", seed=1)
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    env = {"ARBITER_HEADS_DIR": str(heads), "ARBITER_DTYPE": "float32", "ARBITER_THREADS": "1",
           "ARBITER_DEVICE": "cpu", "ARBITER_HEADS_WATCH_S": "0.5", "ARBITER_LOG_LEVEL": "warning"}
    serve.run(deployment(num_replicas=2, env=env), name="arbiter", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        yield url, heads
    finally:
        serve.shutdown()
        ray.shutdown()


def _instances(url: str, tries: int = 40) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for _ in range(tries):
        r = httpx.get(f"{url}/health", timeout=30)
        if r.status_code == 200:
            seen[r.json()["instance"]] = r.json()["heads"]
    return seen


def test_two_replicas_serve_and_share_the_heads_directory(cluster, backbone):
    url, heads = cluster
    # Both replicas come up (each loads its own model) and requests reach both.
    wait_until(lambda: len(_instances(url)) == 2, 300, "two healthy replicas", every_s=0.3)
    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "rerank": {"candidates": 2, "heads": ["h1"]}}
    for _ in range(4):
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200 and r.json()["rerank"]["heads"] == ["h1"]
    # A head written to the shared directory reaches every replica.
    save_random_head(backbone.fingerprint, heads / "h2", name="h2", seed=2)
    wait_until(lambda: (lambda s: len(s) == 2 and all("h2" in v for v in s.values()))(_instances(url)), 60,
               "h2 on both replicas", every_s=0.3)
    # Kill one replica: every request after it is answered (by the other, until Serve replaces it).
    replicas = [n for n in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in n["name"]]
    assert len(replicas) == 2
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]))
    codes = [httpx.post(f"{url}/v1/chat/completions", json={**body, "rerank": {"candidates": 2, "heads": ["h2"]}},
                        timeout=120).status_code for _ in range(6)]
    assert codes == [200] * 6
