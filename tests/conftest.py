"""Shared fixtures: one tiny-model Engine per test session (CPU only, no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ARTIFACTS_DIR = Path(__file__).resolve().parent / "artifacts"


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """A models folder in A1111 layout holding the embedded tiny model, built once per session."""
    from engine.tiny_model import ensure_tiny_model

    root = tmp_path_factory.mktemp("models")
    ensure_tiny_model(root)
    return root


@pytest.fixture(scope="session")
def engine(models_dir):
    from engine import Engine

    return Engine(models_dir=models_dir)


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    return ARTIFACTS_DIR
