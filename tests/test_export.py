"""export-peft / export-merged reproduce the forced-mixture logits (PEFT load, plain transformers load)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_peft_adapter, run_cli
from peft import PeftModel
from transformers import AutoModelForCausalLM

from mergekit_moe.atomic import leftover_staging
from mergekit_moe.base import fingerprint_of
from mergekit_moe.checkpoint import save_checkpoint
from mergekit_moe.errors import CheckpointError, UsageError, ValidationError
from mergekit_moe.export import export_merged, export_peft, mixture_factors, parse_weights
from mergekit_moe.lora import read_adapter
from mergekit_moe.moe.attach import attach_moe
from mergekit_moe.moe.routing import force_mixture
from mergekit_moe.moe.spec import MoeSpec

W = {"diagnosis": 0.7, "ddi": 0.3}


def _build_spec(base, d, arch="llama", targets=("q_proj", "v_proj", "up_proj"), targets_b=("q_proj", "down_proj")):
    a = make_peft_adapter(base, d / "diagnosis", r=4, targets=list(targets), seed=1, scale=0.3)
    b = make_peft_adapter(base, d / "ddi", r=2, alpha=6, targets=list(targets_b), seed=2, scale=0.3)
    s = MoeSpec.from_experts(str(base), fingerprint_of(base), {"diagnosis": read_adapter(a), "ddi": read_adapter(b)},
                             hidden_size=64, knowledge="null", model_type=arch)
    g = torch.Generator().manual_seed(0)
    for m in s.modules.values():  # calibrated rho != 1 must be exported too
        m.rho.copy_(torch.rand(m.rank, generator=g) + 0.5)
    return s


@pytest.fixture(scope="module")
def spec(tiny_base, tmp_path_factory):
    return _build_spec(tiny_base, tmp_path_factory.mktemp("export-experts"))


def _base(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _forced_logits(base, spec, weights, ids):
    model = attach_moe(_base(base), spec)
    with torch.no_grad(), force_mixture(model, weights):
        return model(ids).logits


IDS = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(9))


def test_export_peft_reproduces_forced_mixture(tiny_base, spec, tmp_path):
    ref = _forced_logits(tiny_base, spec, W, IDS)
    out = export_peft(spec, W, tmp_path / "peft")
    assert {"adapter_config.json", "adapter_model.safetensors", "mixture.json", "README.md"} <= {p.name for p in out.iterdir()}
    peft = PeftModel.from_pretrained(_base(tiny_base), out).eval()
    with torch.no_grad():
        got = peft(IDS).logits
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4)
    assert (ref - _base(tiny_base)(IDS).logits).abs().max() > 1e-2  # the mixture is not a no-op
    # q_proj holds both experts (rank 4 + 2), down_proj only ddi, and the null expert adds nothing
    f = mixture_factors(spec, W)
    assert f["model.layers.0.self_attn.q_proj"][0].shape[0] == 6 and f["model.layers.0.mlp.down_proj"][0].shape[0] == 2
    # a single-expert mixture drops the other expert's ranks
    assert "model.layers.0.mlp.down_proj" not in mixture_factors(spec, {"diagnosis": 1.0})
    assert json.loads((out / "mixture.json").read_text())["weights"] == W
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 6 and not cfg["rank_pattern"]  # zero-padded to one rank (vLLM/LoRAX)
    # exact per-module ranks via rank_pattern: same logits
    out2 = export_peft(spec, W, tmp_path / "peft-ranks", uniform_rank=False)
    cfg2 = json.loads((out2 / "adapter_config.json").read_text())
    assert cfg2["rank_pattern"] and set(cfg2["rank_pattern"].values()) | {cfg2["r"]} == {2, 4, 6}
    peft2 = PeftModel.from_pretrained(_base(tiny_base), out2).eval()
    with torch.no_grad():
        assert torch.allclose(peft2(IDS).logits, ref, atol=1e-5, rtol=1e-4)


def test_export_merged_reproduces_forced_mixture(tiny_base, spec, tmp_path):
    ref = _forced_logits(tiny_base, spec, W, IDS)
    out = export_merged(spec, None, W, tmp_path / "merged")
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    merged = _base(out)
    with torch.no_grad():
        got = merged(IDS).logits
    assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
    assert leftover_staging(tmp_path) == []


def test_export_errors(spec, tmp_path):
    with pytest.raises(ValidationError, match="unknown expert"):
        export_peft(spec, {"radiology": 1.0}, tmp_path / "x")
    with pytest.raises(CheckpointError, match="zero update"):
        export_peft(spec, {"null": 1.0}, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    export_peft(spec, W, tmp_path / "y")
    with pytest.raises(CheckpointError, match="already exists"):
        export_peft(spec, W, tmp_path / "y")
    assert parse_weights("diagnosis=0.7, ddi=0.3") == W and parse_weights("ddi") == {"ddi": 1.0}
    for bad in ("diagnosis=x", "", "a=1,a=2"):
        with pytest.raises(UsageError):
            parse_weights(bad)


def test_gpt2_export_peft(tiny_base_factory, tmp_path):
    base = tiny_base_factory("gpt2")
    s = _build_spec(base, tmp_path, arch="gpt2", targets=("c_attn", "c_fc"), targets_b=("c_attn",))
    ref = _forced_logits(base, s, W, IDS)
    out = export_peft(s, W, tmp_path / "peft")
    peft = PeftModel.from_pretrained(_base(base), out).eval()
    merged = _base(export_merged(s, None, W, tmp_path / "merged"))
    with torch.no_grad():
        assert torch.allclose(peft(IDS).logits, ref, atol=1e-5, rtol=1e-4)
        assert torch.allclose(merged(IDS).logits, ref, atol=1e-4, rtol=1e-4)


def test_cli_exports(spec, tiny_base, tmp_path):
    ck = save_checkpoint(spec, tmp_path / "ck")
    ref = _forced_logits(tiny_base, spec, {"ddi": 1.0}, IDS)
    p = run_cli("export-peft", ck, tmp_path / "peft", "--weights", "ddi=1", check=True)
    assert "PEFT LoRA" in p.stdout
    peft = PeftModel.from_pretrained(_base(tiny_base), tmp_path / "peft").eval()
    with torch.no_grad():
        assert torch.allclose(peft(IDS).logits, ref, atol=1e-5, rtol=1e-4)
    p = run_cli("export-merged", ck, tmp_path / "merged", "--weights", "ddi=1", "--dtype", "bfloat16", check=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.bfloat16
    p = run_cli("export-peft", ck, tmp_path / "bad", "--weights", "radiology=1")
    assert p.returncode == 1 and "unknown expert" in p.stderr and not (tmp_path / "bad").exists()
    p = run_cli("export-peft", ck, tmp_path / "bad", "--weights", "ddi=abc")
    assert p.returncode == 2 and "--weights" in p.stderr
