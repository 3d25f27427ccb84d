"""Opt-in checks against the live Hugging Face Hub, for what the local server cannot show (Xet, the Hub's
own validation, rate limits). Skipped unless ``MOEMERGE_LIVE_HUB=1`` and ``HF_TOKEN`` are set and the Hub
is reachable. ``MOEMERGE_LIVE_HUB_REPO=you/scratch-repo`` also runs a push/pull round trip there.
"""

from __future__ import annotations

import os
import socket

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("MOEMERGE_LIVE_HUB") != "1" or not os.environ.get("HF_TOKEN"),
                                reason="live Hub test: set MOEMERGE_LIVE_HUB=1 and HF_TOKEN")


@pytest.fixture
def live(monkeypatch):
    try:
        socket.create_connection(("huggingface.co", 443), timeout=5).close()
    except OSError:
        pytest.skip("huggingface.co is not reachable")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return "https://huggingface.co"


def test_live_search(live):
    from mergekit_moe.hub import search

    hits = search(None, all_lora=True, limit=5, endpoint=live)
    assert all("/" in h.repo_id for h in hits)


def test_live_roundtrip(live, expert_bundle, tmp_path):
    repo = os.environ.get("MOEMERGE_LIVE_HUB_REPO")
    if not repo:
        pytest.skip("set MOEMERGE_LIVE_HUB_REPO=you/scratch-repo to push there")
    from mergekit_moe.hashing import sha256_file
    from mergekit_moe.hub import pull, push
    from mergekit_moe.registry import Registry

    res = push(expert_bundle[0], repo, private=True, subfolder="moemerge-live-test", endpoint=live)
    got = pull(f"{repo}@{res.commit}:moemerge-live-test", Registry(tmp_path / "reg"), endpoint=live)
    assert sha256_file(got.entry.path / "adapter_model.safetensors") == \
        sha256_file(expert_bundle[0] / "adapter_model.safetensors")


from hub_fixtures import expert_bundle  # noqa: E402,F401  (the fixture, only needed when enabled)
