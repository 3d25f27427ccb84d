"""lora.py round trip against real PEFT: read an adapter, write it back, same logits."""

import torch
from helpers import make_peft_adapter

from mergekit_moe.lora import read_adapter, write_adapter


def _logits(base_dir, adapter_dir, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        return model(ids).logits


def test_read_write_roundtrip_mixed_ranks(tiny_base, tmp_path):
    src = make_peft_adapter(tiny_base, tmp_path / "src", r=4, alpha=16, targets=["q_proj", "down_proj"])
    ad = read_adapter(src)
    assert len(ad.factors) == 8 and all(f.scale == 4.0 for f in ad.factors.values())
    # give one module another rank by appending zero components: output must not change
    facs = {m: (f.A, f.B * f.scale) for m, f in ad.factors.items()}
    m0 = sorted(facs)[0]
    a, b = facs[m0]
    facs[m0] = (torch.cat([a, torch.randn(2, a.shape[1])]), torch.cat([b, torch.zeros(b.shape[0], 2)], dim=1))
    write_adapter(tmp_path / "dst", facs, base_model=str(tiny_base))
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    torch.testing.assert_close(_logits(tiny_base, tmp_path / "dst", ids), _logits(tiny_base, src, ids))
    assert read_adapter(tmp_path / "dst").factors[m0].rank == 6
