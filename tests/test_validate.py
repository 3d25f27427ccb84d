"""validate_adapter against real tiny bases: modules, shapes, ranks, NaN/Inf, target modules; pickle conversion."""

import copy
import os

import pytest
import torch
from helpers import make_peft_adapter

from mergekit_moe.errors import UnsafeFileError, ValidationError
from mergekit_moe.lora import Adapter, LoraFactors, read_adapter
from mergekit_moe.validate import convert_pickle_adapter, module_shapes, validate_adapter


@pytest.fixture(scope="module")
def llama_adapter(tiny_base, tmp_path_factory):
    d = make_peft_adapter(tiny_base, tmp_path_factory.mktemp("v") / "a", r=4, targets=["q_proj", "k_proj", "down_proj"])
    return read_adapter(d)


def _copy(ad: Adapter) -> Adapter:
    return Adapter(copy.deepcopy(ad.config), {m: LoraFactors(m, f.A.clone(), f.B.clone(), f.scale) for m, f in ad.factors.items()})


def test_valid_adapter_against_dir_config_and_model(tiny_base, llama_adapter):
    from transformers import AutoConfig, AutoModelForCausalLM

    validate_adapter(llama_adapter, tiny_base)
    validate_adapter(llama_adapter, AutoConfig.from_pretrained(tiny_base))
    validate_adapter(llama_adapter, AutoModelForCausalLM.from_pretrained(tiny_base))
    shapes = module_shapes(tiny_base)
    assert shapes["model.layers.0.self_attn.k_proj"] == ("Linear", 64, 32)  # GQA: 2 kv heads of 16
    assert shapes["model.layers.3.mlp.down_proj"] == ("Linear", 128, 64)


def test_shape_mismatch_names_the_tensor(tiny_base_factory, llama_adapter):
    wide = tiny_base_factory("llama", hidden=128)
    with pytest.raises(ValidationError) as exc:
        validate_adapter(llama_adapter, wide)
    assert "base_model.model.model.layers." in str(exc.value) and ".lora_A.weight" in str(exc.value)
    assert "128" in str(exc.value)


def test_b_shape_mismatch_names_lora_b(tiny_base, llama_adapter):
    ad = _copy(llama_adapter)
    m = "model.layers.2.self_attn.k_proj"
    ad.factors[m].B = torch.zeros(64, 4)  # k_proj outputs 32, not 64
    with pytest.raises(ValidationError, match=r"layers\.2\.self_attn\.k_proj\.lora_B\.weight.*\(32, 4\)"):
        validate_adapter(ad, tiny_base)


def test_missing_module_and_unknown_target(tiny_base, tiny_base_factory, llama_adapter):
    ad = _copy(llama_adapter)
    f = ad.factors.pop("model.layers.1.self_attn.q_proj")
    ad.factors["model.layers.9.self_attn.q_proj"] = f  # the base has 4 layers
    with pytest.raises(ValidationError, match=r"layers\.9\.self_attn\.q_proj.*does not exist"):
        validate_adapter(ad, tiny_base)
    ad2 = _copy(llama_adapter)
    ad2.config["target_modules"] = ["q_proj", "k_proj", "down_proj", "w_gate"]
    with pytest.raises(ValidationError, match="target module 'w_gate' matches no module"):
        validate_adapter(ad2, tiny_base)
    # a Llama adapter on a GPT-2 base: unknown targets are an error, not a warning
    with pytest.raises(ValidationError, match="matches no module"):
        validate_adapter(llama_adapter, tiny_base_factory("gpt2"))


def test_regex_target_modules(tiny_base, llama_adapter):
    ad = _copy(llama_adapter)
    ad.config["target_modules"] = r".*\.(q_proj|k_proj|down_proj)"
    validate_adapter(ad, tiny_base)
    ad.config["target_modules"] = r".*\.wq"
    with pytest.raises(ValidationError, match="regex"):
        validate_adapter(ad, tiny_base)


def test_rank_and_nan_checks(tiny_base, llama_adapter):
    ad = _copy(llama_adapter)
    ad.config["r"] = 8
    with pytest.raises(ValidationError, match="rank 4 in the tensors but 8"):
        validate_adapter(ad, tiny_base)
    ad = _copy(llama_adapter)
    m = sorted(ad.factors)[3]
    ad.factors[m].B[0, 0] = float("inf")
    with pytest.raises(ValidationError, match=rf"{m}\.lora_B\.weight.*NaN or Inf"):
        validate_adapter(ad, tiny_base)


def test_gpt2_conv1d_adapter_is_valid(tiny_base_factory, tmp_path):
    g = tiny_base_factory("gpt2")
    ad = read_adapter(make_peft_adapter(g, tmp_path / "g", targets=["c_attn", "c_proj", "c_fc"]))
    validate_adapter(ad, g)
    assert module_shapes(g)["transformer.h.0.attn.c_attn"] == ("Conv1D", 64, 192)


def test_convert_pickle_only_plain_tensors(tiny_base, tmp_path):
    src = make_peft_adapter(tiny_base, tmp_path / "a")
    from safetensors.torch import load_file

    state = load_file(src / "adapter_model.safetensors")
    torch.save(state, tmp_path / "adapter_model.bin")
    out = convert_pickle_adapter(tmp_path / "adapter_model.bin", tmp_path / "conv.safetensors")
    back = load_file(out)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Evil()}, tmp_path / "evil.bin", _use_new_zipfile_serialization=True)
    with pytest.raises(UnsafeFileError, match="refused to convert"):
        convert_pickle_adapter(tmp_path / "evil.bin", tmp_path / "evil.safetensors")
    assert not marker.exists() and not (tmp_path / "evil.safetensors").exists()
    torch.save([1, 2, 3], tmp_path / "list.bin")
    with pytest.raises(UnsafeFileError, match="state dict"):
        convert_pickle_adapter(tmp_path / "list.bin", tmp_path / "list.safetensors")
