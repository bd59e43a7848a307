"""Deployment settings: the compose file's restart policies and read-only heads, keys passed to Ray replicas by
reference only, keys read from files, and the Host allow-list against DNS rebinding (a live server)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import yaml

from arbiter.service.app import host_name
from arbiter.service.ray_serve import replica_env
from arbiter.service.settings import Settings
from arbiter.testing.served import assert_error, served

ROOT = Path(__file__).resolve().parents[1]


def test_compose_services_restart_and_mount_heads_read_only():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name in ("arbiter", "arbiter-gpu"):
        svc = compose["services"][name]
        assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), name  # exit 3 after a device loss
        heads = [v for v in svc["volumes"] if ":/heads" in v]
        assert heads and all(v.endswith(":ro") for v in heads), (name, svc["volumes"])


def test_ray_replicas_never_get_keys_by_value():
    env = replica_env({"ARBITER_HEADS_DIR": "/h"}, environ={"ARBITER_API_KEY_FILE": "/run/secrets/k", "PATH": "/bin"})
    assert env == {"ARBITER_HEADS_DIR": "/h", "ARBITER_API_KEY_FILE": "/run/secrets/k", "ARBITER_HEADS_WATCH_S": "2"}
    for where in ("environ", "env"):
        kw = {"environ": {"ARBITER_ADMIN_KEY": "s3cret"}} if where == "environ" else {
            "env": {"ARBITER_API_KEY": "s3cret"}, "environ": {}}
        with pytest.raises(ValueError, match="_KEY_FILE") as ei:
            replica_env(**kw)
        assert "s3cret" not in str(ei.value)
    # compose's ${ARBITER_API_KEY:-} (empty: no key) is no key, and is not forwarded either
    assert "ARBITER_API_KEY" not in replica_env(environ={"ARBITER_API_KEY": ""})


def test_keys_can_come_from_files(tmp_path):
    (tmp_path / "api").write_text("k-from-file\n")
    (tmp_path / "empty").write_text("  \n")
    s = Settings(api_key_file=str(tmp_path / "api"))
    assert s.api_key is not None and s.api_key.get_secret_value() == "k-from-file"
    for kw, match in (({"api_key_file": str(tmp_path / "empty")}, "empty"),
                      ({"api_key_file": str(tmp_path / "missing")}, "cannot be read"),
                      ({"api_key": "x", "api_key_file": str(tmp_path / "api")}, "not both")):
        with pytest.raises(ValueError, match=match):
            Settings(**kw)
    with served(api_key_file=str(tmp_path / "api")) as srv:
        body = {"model": "fake-backbone", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30).status_code == 401
        ok = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30,
                        headers={"Authorization": "Bearer k-from-file"})
        assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("header, name", [("localhost:8000", "localhost"), ("127.0.0.1", "127.0.0.1"),
                                          ("[::1]:8000", "::1"), ("Example.COM:80", "example.com"), ("::1", "::1")])
def test_host_name_drops_the_port(header, name):
    assert host_name(header) == name


def test_allowed_hosts_refuse_a_rebinding_host():
    with served(allowed_hosts="localhost, 127.0.0.1") as srv, httpx.Client(timeout=30) as c:
        assert c.get(srv.url + "/health").status_code == 200  # Host: 127.0.0.1:<port>
        assert c.get(srv.url + "/health", headers={"Host": "localhost"}).status_code == 200
        r = c.post(srv.url + "/v1/chat/completions", headers={"Host": "evil.example:8000"},
                   json={"model": "fake-backbone", "messages": [{"role": "user", "content": "hi"}]})
        assert_error(r, 400, code="host_not_allowed", in_message="ARBITER_ALLOWED_HOSTS")
        assert_error(c.get(srv.url + "/v1/models", headers={"Host": "127.0.0.1.evil.example"}), 400,
                     code="host_not_allowed")
    with served() as srv:  # unset: any host (the default, unchanged)
        assert httpx.get(srv.url + "/health", headers={"Host": "evil.example"}, timeout=30).status_code == 200
