"""Checkpoint format: round trip, hash verification, atomic writes, model card, `moemerge inspect` / `generate`."""

from __future__ import annotations

import json

import re

import pytest
import torch
from helpers import make_peft_adapter, run_cli

from mergekit_moe.atomic import leftover_staging
from mergekit_moe.base import fingerprint_of, load_base
from mergekit_moe.checkpoint import CONFIG, WEIGHTS, load_checkpoint, load_moe_model, save_checkpoint
from mergekit_moe.errors import BaseMismatchError, CheckpointError, FormatError, IntegrityError, MoeMergeError
from mergekit_moe.lora import read_adapter
from mergekit_moe.moe.routing import record_routing
from mergekit_moe.moe.spec import ExpertInfo, MoeSpec, Routing

RECIPE = "name: demo\nbase: tiny\nexperts:\n  - diagnosis\n  - ddi\n"


@pytest.fixture(scope="module")
def spec(tiny_base, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt-experts")
    a = make_peft_adapter(tiny_base, d / "diagnosis", r=4, targets=["q_proj", "v_proj", "up_proj"], seed=1, scale=0.3)
    b = make_peft_adapter(tiny_base, d / "ddi", r=2, targets=["q_proj", "down_proj"], seed=2, scale=0.3)
    infos = {"diagnosis": ExpertInfo("diagnosis", source="diagnosis@1", sha256="ab" * 32, provenance={"task": "diagnosis"}),
             "ddi": ExpertInfo("ddi", source="ddi@2", sha256="cd" * 32, provenance={"task": "ddi"})}
    s = MoeSpec.from_experts(str(tiny_base), fingerprint_of(tiny_base), {"diagnosis": read_adapter(a), "ddi": read_adapter(b)},
                             hidden_size=64, knowledge="null", model_type="llama", routing=Routing("sequence", 0.8, 2),
                             infos=infos)
    g = torch.Generator().manual_seed(0)
    for lay in s.layers.values():
        lay.router_weight.copy_(torch.randn(lay.router_weight.shape, generator=g))
        lay.router_bias = torch.randn(lay.n_slots, generator=g)
    for m in s.modules.values():
        m.rho.copy_(torch.rand(m.rank, generator=g) + 0.5)
    s.metrics = {"diagnosis/accuracy": 0.81, "retention/kl": 0.012}
    return s


def test_round_trip(spec, tmp_path):
    out = save_checkpoint(spec, tmp_path / "ck", recipe_text=RECIPE)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "moe_config.json", "moe_lora.safetensors", "recipe.yaml"]
    assert leftover_staging(tmp_path) == []
    back = load_checkpoint(out)
    assert back.recipe == RECIPE and back.metrics == spec.metrics
    assert back.routing == spec.routing and back.base_fingerprint == spec.base_fingerprint
    assert {n: e.to_json() for n, e in back.experts.items()} == {n: e.to_json() for n, e in spec.experts.items()}
    assert back.knowledge_expert == "null"
    for L, lay in spec.layers.items():
        assert [s.to_json() for s in back.layers[L].slots] == [s.to_json() for s in lay.slots]
        assert torch.equal(back.layers[L].router_weight, lay.router_weight) and torch.equal(back.layers[L].router_bias, lay.router_bias)
    for n, m in spec.modules.items():
        b = back.modules[n]
        assert torch.equal(b.A, m.A) and torch.equal(b.B, m.B) and torch.equal(b.rho, m.rho)
        assert torch.equal(b.slot_of_rank, m.slot_of_rank) and b.slot_of_rank.dtype == torch.long
    cfg = json.loads((out / CONFIG).read_text())
    assert cfg["format_version"] == 1 and cfg["base"]["fingerprint"] == spec.base_fingerprint
    assert set(cfg["files"]) == {"moe_lora.safetensors", "recipe.yaml", "README.md"}
    lay0 = cfg["layers"][0]
    assert [s["name"] for s in lay0["slots"]] == ["diagnosis", "ddi", "null"]
    assert lay0["slots"][0]["ranks"]["model.layers.0.self_attn.q_proj"] == 4
    assert lay0["slots"][1]["ranks"]["model.layers.0.self_attn.v_proj"] == 0  # ddi lacks v_proj
    card = (out / "README.md").read_text()
    assert "base_model:" in card and "| diagnosis | task | diagnosis@1 |" in card and "diagnosis/accuracy" in card


def test_tampering_and_bad_input_are_refused(spec, tmp_path):
    out = save_checkpoint(spec, tmp_path / "ck")
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(spec, out)
    save_checkpoint(spec, out, overwrite=True)  # allowed when asked
    w = out / WEIGHTS
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256") as ei:
        load_checkpoint(out)
    assert "moe_lora.safetensors" in str(ei.value) and "\n" not in str(ei.value)
    out2 = save_checkpoint(spec, tmp_path / "ck2")
    (out2 / "recipe.yaml").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        load_checkpoint(out2)
    out3 = save_checkpoint(spec, tmp_path / "ck3")
    cfg = json.loads((out3 / CONFIG).read_text())
    cfg["format_version"] = 99
    (out3 / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(out3)
    (out3 / CONFIG).write_text("{not json")
    with pytest.raises(FormatError):
        load_checkpoint(out3)
    with pytest.raises(CheckpointError, match="no moe_config.json"):
        load_checkpoint(tmp_path)


def test_interrupted_save_leaves_nothing(spec, tmp_path, monkeypatch):
    import mergekit_moe.checkpoint as ck

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(ck, "model_card", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(spec, tmp_path / "ck")
    assert not (tmp_path / "ck").exists() and leftover_staging(tmp_path) == []


def test_load_moe_model_checks_fingerprint(spec, tmp_path, tiny_base_factory):
    out = save_checkpoint(spec, tmp_path / "ck")
    model, tok, back = load_moe_model(out)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "MoeLoraLinear"
    other = tiny_base_factory("llama", seed=0, layers=4, hidden=64, heads=2)  # same shapes, other config field
    with pytest.raises(BaseMismatchError, match="fingerprint"):
        load_moe_model(out, base=str(other))


def test_cli_inspect_and_generate(spec, tmp_path, tiny_base):
    out = save_checkpoint(spec, tmp_path / "ck", recipe_text=RECIPE)
    p = run_cli("inspect", out, check=True)
    for text in ("diagnosis", "ddi", "null", "knowledge", "sequence-level", "moe_lora.safetensors", "all file hashes verified"):
        assert text in p.stdout, text
    # slot members are shown literally (not eaten as rich markup), equal layers collapse into one range row
    assert "diagnosis r=" in p.stdout and "null r=0" in p.stdout
    assert re.search(r"│ 0-3 +│ 3 +│", p.stdout), p.stdout
    # the completion printed by the CLI equals an in-process greedy generation with the same checkpoint
    model, tok, _ = load_moe_model(out)
    text = tok.apply_chat_template([{"role": "user", "content": "fever and cough"}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad(), record_routing(model) as rec:
        ids = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    p = run_cli("generate", out, "fever and cough", "--max-new-tokens", "6", "--show-routing", check=True)
    assert p.stdout.startswith(expected.strip()[:20])
    assert "Mixture weights per layer group" in p.stdout and "diagnosis" in p.stdout
    first = rec.expert_means()[0]["diagnosis"]
    assert f"{first:.3f}" in p.stdout  # layer 0 is its own group with 4 layers
    # tampered checkpoint: one line, exit 1, nothing printed to stdout
    (out / "README.md").write_text("changed\n")
    p = run_cli("inspect", out)
    assert p.returncode == 1 and "error:" in p.stderr and "README.md" in p.stderr and p.stdout == ""


def test_crafted_tensor_file_is_refused(spec, tmp_path):
    """A weights file with a wrong dtype, a missing or an extra tensor (hashes updated to match) is refused by name."""
    from safetensors.torch import load_file, save_file

    from mergekit_moe.hashing import sha256_file

    def rewrite(out, mutate):
        w = out / WEIGHTS
        tensors = load_file(str(w))
        mutate(tensors)
        save_file(tensors, str(w))
        cfg = json.loads((out / CONFIG).read_text())
        cfg["files"][WEIGHTS] = {"sha256": sha256_file(w), "size": w.stat().st_size}
        (out / CONFIG).write_text(json.dumps(cfg))

    name = "modules.model.layers.1.self_attn.q_proj"
    cases = {
        "int-A": (lambda t: t.__setitem__(f"{name}.A", t[f"{name}.A"].long()), "floating point"),
        "missing": (lambda t: t.pop(f"{name}.rho"), "missing"),
        "extra": (lambda t: t.__setitem__("modules.evil.A", torch.zeros(2, 2)), "unexpected tensor"),
        "slot-range": (lambda t: t.__setitem__(f"{name}.slot_of_rank", t[f"{name}.slot_of_rank"] + 7), "outside"),
        "nan": (lambda t: t[f"{name}.B"].__setitem__((0, 0), float("nan")), "NaN"),
    }
    for case, (mutate, msg) in cases.items():
        out = save_checkpoint(spec, tmp_path / case)
        rewrite(out, mutate)
        with pytest.raises(MoeMergeError, match=msg) as ei:
            load_checkpoint(out)
        assert "\n" not in str(ei.value) and str(out) in str(ei.value), case
