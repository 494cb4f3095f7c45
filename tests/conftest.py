"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The converted default model (converted once per machine, ~25 s; then reused)."""
    from worker.default_model import ensure_default_model

    return ensure_default_model()
