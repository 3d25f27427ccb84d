"""Fixtures: a tiny Llama base (built once per session), an isolated registry home per test."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """Directory of a tiny random Llama (hidden 64, 4 layers) with a byte-level BPE tokenizer."""
    from mergekit_moe.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_base_factory(tmp_path_factory):
    """Build (and cache) a tiny base of another family: ``tiny_base_factory("gpt2")``."""
    from mergekit_moe.tiny import build_tiny_model

    cache = {}

    def make(arch: str = "llama", **size):
        key = (arch, tuple(sorted(size.items())))
        if key not in cache:
            cache[key] = build_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch=arch, **size)
        return cache[key]

    return make


@pytest.fixture(autouse=True)
def moemerge_home(tmp_path, monkeypatch):
    """Every test gets its own registry and HF home; nothing touches the user's real ones."""
    home = tmp_path / "moemerge-home"
    monkeypatch.setenv("MOEMERGE_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return home
