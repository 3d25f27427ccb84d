"""Fixtures for Hub tests: a local Hub-compatible server, client settings, a ready-made expert bundle.

Import with ``from hub_fixtures import *`` in a test module.

``hub_env`` is parametrizable by upload mode: ``"lfs"`` (binary files through classic LFS, client run
with ``HF_HUB_DISABLE_XET=1``) or ``"regular"`` (every file inline; Xet left on in the client).
In-process calls get the same settings by patching ``huggingface_hub.constants`` (read at import).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from hub_server import HubServer

TOKEN = "hf_test_write"
OTHER_TOKEN = "hf_test_bob"


@dataclass
class HubEnv:
    server: HubServer
    mode: str
    tmp: Path

    @property
    def url(self) -> str:
        return self.server.url

    def env(self, *, token: str | None = TOKEN, **extra: str) -> dict[str, str]:
        """Subprocess environment: our server, a private HF_HOME, no telemetry, xet per mode."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") or k in ("HF_HOME",)}
        env.update({"HF_ENDPOINT": self.url, "HF_HOME": str(self.tmp / "hf-home"), "HF_HUB_OFFLINE": "0",
                    "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "COLUMNS": "250",
                    "MOEMERGE_HUB_BACKOFF": "0.05", "MOEMERGE_HUB_RETRIES": "3"})
        if token is not None:
            env["HF_TOKEN"] = token
        if self.mode == "lfs":
            env["HF_HUB_DISABLE_XET"] = "1"
        env.update(extra)
        return env

    def run(self, *args, token: str | None = TOKEN, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
        """``moemerge ARGS`` as a subprocess against this server."""
        full = self.env(token=token, **(env or {}))
        return subprocess.run([sys.executable, "-m", "mergekit_moe", *map(str, args)], capture_output=True, text=True,
                              env=full, timeout=timeout, cwd=str(Path(__file__).resolve().parents[1]))


@pytest.fixture(params=["lfs", "regular"])
def hub_env(request, tmp_path, monkeypatch):
    """A running server (both upload modes), with the in-process client configured for it."""
    return _start(request.param, tmp_path, monkeypatch, request)


@pytest.fixture
def hub_env_lfs(request, tmp_path, monkeypatch):
    """A running server in LFS mode only (for tests that do not depend on the upload mode)."""
    return _start("lfs", tmp_path, monkeypatch, request)


def _start(mode: str, tmp_path: Path, monkeypatch, request) -> HubEnv:
    from huggingface_hub import constants

    srv = HubServer(upload_mode=mode).start()
    request.addfinalizer(srv.stop)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", mode == "lfs")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("MOEMERGE_HUB_BACKOFF", "0.05")
    return HubEnv(srv, mode, tmp_path)


@pytest.fixture(scope="session")
def expert_bundle(tiny_base, tmp_path_factory):
    """A real expert bundle (PEFT LoRA on the tiny base) built once per session: (bundle_dir, adapter_dir)."""
    from helpers import make_peft_adapter

    from mergekit_moe.bundle import bundle_from_adapter

    root = tmp_path_factory.mktemp("hub-expert")
    adapter = make_peft_adapter(tiny_base, root / "adapter", r=4, seed=3)
    b = bundle_from_adapter(adapter, root / "bundle", name="dx", task="diagnosis", base=str(tiny_base),
                            tags=["medical"], datasets=["medorg/dx-notes"], metrics={"accuracy": 0.81})
    return b.path, adapter


__all__ = ["hub_env", "hub_env_lfs", "expert_bundle", "HubEnv", "TOKEN", "OTHER_TOKEN"]
