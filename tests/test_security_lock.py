"""Lock files end to end through ``moemerge compose`` (issue 9, item 7).

tests/test_lockfile.py checks ``hub.fetch_expert`` directly. Here the user's flow: the first
``moemerge compose`` of a recipe with an ``hf://`` expert writes ``recipe.lock.json`` pinning a
40-hex commit and file hashes; when the same name later serves different content, compose exits 1
naming ``--update`` and writes nothing; ``--update`` accepts it and rewrites the lock.
"""

from __future__ import annotations

import json

import pytest

from helpers import make_peft_adapter
from hub_fixtures import *  # noqa: F403
from hub_fixtures import TOKEN

from mergekit_moe.hub import push

RECIPE = """base_model: ./base
experts:
  - {name: a, source: ./exp-a}
  - {name: dx, source: "hf://medorg/locked-dx"}
output: {path: ./out}
"""


@pytest.mark.slow
def test_compose_pins_hf_experts_and_refuses_changed_content_unless_update(hub_env_lfs, expert_bundle, tiny_base, tmp_path):
    from mergekit_moe.bundle import bundle_from_adapter
    from mergekit_moe.checkpoint import load_checkpoint

    url = hub_env_lfs.url
    first = push(expert_bundle[0], "medorg/locked-dx", endpoint=url, token=TOKEN)
    w = tmp_path / "w"
    w.mkdir()
    (w / "base").symlink_to(tiny_base)
    make_peft_adapter(tiny_base, w / "exp-a", seed=5, scale=0.05)
    (w / "recipe.yaml").write_text(RECIPE)
    env = {"MOEMERGE_HOME": str(tmp_path / "home")}

    p = hub_env_lfs.run("compose", w / "recipe.yaml", env=env)
    assert p.returncode == 0, p.stderr
    lock_file = w / "recipe.lock.json"
    lock = json.loads(lock_file.read_text())
    (entry,) = lock["experts"].values()
    assert entry["commit"] == first.commit and len(entry["commit"]) == 40
    assert set(entry["files"]) >= {"adapter_model.safetensors", "adapter_config.json", "expert.json"}
    assert load_checkpoint(w / "out").experts

    # the same name now serves other content
    other = bundle_from_adapter(make_peft_adapter(tiny_base, tmp_path / "a2", seed=12), tmp_path / "b2", name="dx",
                                task="diagnosis", base=str(tiny_base))
    second = push(other.path, "medorg/locked-dx", endpoint=url, token=TOKEN)
    assert second.commit != first.commit
    lock_bytes = lock_file.read_bytes()
    out_before = (w / "out" / "moe_lora.safetensors").read_bytes()
    p = hub_env_lfs.run("compose", w / "recipe.yaml", "--force", env=env)
    assert p.returncode == 1, p.stdout
    err = " ".join(p.stderr.split())
    assert "--update" in err and "medorg/locked-dx" in err and "Traceback" not in p.stderr, err
    assert lock_file.read_bytes() == lock_bytes  # the lock is not rewritten by a refused run
    assert (w / "out" / "moe_lora.safetensors").read_bytes() == out_before  # nor the previous output

    p = hub_env_lfs.run("compose", w / "recipe.yaml", "--force", "--update", env=env)
    assert p.returncode == 0, p.stderr
    (entry,) = json.loads(lock_file.read_text())["experts"].values()
    assert entry["commit"] == second.commit
