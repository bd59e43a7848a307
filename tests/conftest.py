"""Shared pytest fixtures."""
import pytest


@pytest.fixture(scope="session")
def backbone():
    """The real tiny backbone (SmolLM2-135M-Instruct), loaded once per test session."""
    from arbiter.backbone import load_backbone

    return load_backbone()
