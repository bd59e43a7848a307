"""Shared pytest fixtures."""
import pytest


@pytest.fixture(scope="session")
def backbone():
    """The real tiny backbone (SmolLM2-135M-Instruct), loaded once per test session."""
    from arbiter.backbone import load_backbone

    return load_backbone()


@pytest.fixture(scope="session")
def short_hh_pairs(backbone):
    """``short_hh_pairs(n, max_len, seed=0)``: the first ``n`` pairs (fewer if the data runs out) of the seeded
    hh-rlhf order whose prompt plus longer answer fit in ``max_len`` tokens and whose answers differ."""
    from arbiter.backbone import encode_chat
    from arbiter.training.data import load_pairs

    def pick(n: int, max_len: int, seed: int = 0) -> list:
        pairs, _ = load_pairs("hh-rlhf", seed=seed)
        keep = []
        for p in pairs:
            pids, cids = encode_chat(backbone.tokenizer, p.prompt, p.chosen, backbone.end_id)
            _, rids = encode_chat(backbone.tokenizer, p.prompt, p.rejected, backbone.end_id)
            if len(pids) + max(len(cids), len(rids)) <= max_len and p.chosen.strip() != p.rejected.strip():
                keep.append(p)
            if len(keep) == n:
                break
        return keep

    return pick


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module: on a shared 2-core machine two threads spin-waiting against
    other processes are several times slower than one. Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- markers: a fast default suite and the integration suite (README "Tests") ---------------------------------
#
# `python -m pytest` runs the pure and fake-engine tests (about a minute: the edit loop). Everything that loads the
# real model, starts a subprocess server, a Ray cluster or the fuzzer is marked `integration` here, and so is every
# `slow`, `gpu` and `vllm` test; the README's test command and .ci/run run all of them with `-m ''`.
INTEGRATION_MODULES = {"test_service_live", "test_clients", "test_ray_serve", "test_fuzz", "test_cli",
                       "test_overload_and_faults", "test_openai_conformance", "test_chat_templates"}
REAL_MODEL_FIXTURES = {"backbone", "short_hh_pairs"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if (module in INTEGRATION_MODULES or REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ()))
                or any(item.get_closest_marker(m) for m in ("slow", "gpu", "vllm"))):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def deepconf_utils():
    """``deepconf/utils.py`` of the reference package (PyPI ``deepconf``), loaded by path: the package's
    ``__init__`` imports vLLM. Skips where the package is not installed."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("deepconf")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the deepconf package is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "utils.py"
    mod_spec = importlib.util.spec_from_file_location("deepconf_utils", path)
    assert mod_spec is not None and mod_spec.loader is not None
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def fake_srv():
    """The live app on the scripted fake engine (``arbiter.testing.fakes.DEFAULT_SCRIPT``) with head ``A`` (reward =
    feature 0), one per test module; ``.engine`` is the engine, whose ``batches`` record every job."""
    from arbiter.testing.fakes import FakeEngine, linear_head, registry_with
    from arbiter.testing.served import served

    engine = FakeEngine()
    with served(engine, registry_with(linear_head("A", [1, 0, 0, 0]))) as s:
        s.engine = engine
        yield s
