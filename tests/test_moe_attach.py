"""attach/detach on real transformers models: parity with PEFT, detach restores the base, KV-cache generation."""

from __future__ import annotations

import pytest
import torch
from helpers import make_peft_adapter
from peft import PeftModel
from transformers import AutoModelForCausalLM

from mergekit_moe.errors import BaseMismatchError, CheckpointError, ValidationError
from mergekit_moe.lora import read_adapter
from mergekit_moe.moe.attach import attach_moe, detach_moe, extract_spec, is_attached, moe_parameters
from mergekit_moe.moe.routing import force_mixture, record_routing
from mergekit_moe.moe.spec import MoeSpec, Routing

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def experts(tiny_base, tmp_path_factory):
    """Three real PEFT adapters of different ranks, alphas and target sets (one with rsLoRA)."""
    d = tmp_path_factory.mktemp("experts")
    return {
        "diagnosis": make_peft_adapter(tiny_base, d / "diagnosis", r=4, alpha=8, targets=ALL, seed=1, scale=0.3),
        "ddi": make_peft_adapter(tiny_base, d / "ddi", r=2, alpha=4, targets=["q_proj", "v_proj", "down_proj"], seed=2, scale=0.3),
        "summary": make_peft_adapter(tiny_base, d / "summary", r=8, alpha=16, targets=["v_proj", "o_proj", "up_proj"], seed=3,
                                     scale=0.3, use_rslora=True),
    }


def _spec(base, experts, **kw) -> MoeSpec:
    return MoeSpec.from_experts(str(base), "", {n: read_adapter(p) for n, p in experts.items()}, hidden_size=64,
                                model_type="llama", **kw)


def _base(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _ids(n=2, t=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (n, t), generator=g)


def test_forced_single_expert_matches_peft(tiny_base, experts):
    ids = _ids()
    model = attach_moe(_base(tiny_base), _spec(tiny_base, experts, knowledge="null"))
    with torch.no_grad():
        base_logits = None
        for name, path in experts.items():
            with force_mixture(model, {name: 1.0}):
                ours = model(ids).logits
            peft = PeftModel.from_pretrained(_base(tiny_base), path).eval()
            ref = peft(ids).logits
            assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), name
            base_logits = peft.get_base_model()
        with force_mixture(model, {"null": 1.0}):
            assert torch.allclose(model(ids).logits, _base(tiny_base)(ids).logits, atol=1e-6)
        # a real LoRA changes the output: the parity above is not vacuous
        with force_mixture(model, {"diagnosis": 1.0}):
            assert (model(ids).logits - _base(tiny_base)(ids).logits).abs().max() > 1e-2
    assert base_logits is not None


def test_forced_mixture_matches_peft_weighted_cat(tiny_base, experts):
    ids = _ids(seed=1)
    w = {"diagnosis": 0.6, "ddi": 0.3, "summary": 0.45}  # not normalised on purpose: used as given
    model = attach_moe(_base(tiny_base), _spec(tiny_base, experts))
    with torch.no_grad(), force_mixture(model, w):
        ours = model(ids).logits
    peft = PeftModel.from_pretrained(_base(tiny_base), experts["diagnosis"], adapter_name="diagnosis").eval()
    for n in ("ddi", "summary"):
        peft.load_adapter(experts[n], adapter_name=n)
    peft.add_weighted_adapter(list(w), list(w.values()), "mix", combination_type="cat")
    peft.set_adapter("mix")
    with torch.no_grad():
        ref = peft(ids).logits
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-4)


def test_detach_restores_base_and_base_weights_untouched(tiny_base, experts):
    model = _base(tiny_base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    originals = {n: m for n, m in model.named_modules()}
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    spec = _spec(tiny_base, experts)
    for lay in spec.layers.values():
        lay.router_weight.normal_()
    attach_moe(model, spec)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "MoeLoraLinear"
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, ref)
        model.generate(ids[:1, :4], max_new_tokens=2, do_sample=False)
    detach_moe(model)
    assert not is_attached(model)
    assert "generate" not in model.__dict__
    after = dict(model.named_modules())
    assert after.keys() == originals.keys() and all(after[k] is originals[k] for k in after)
    sd = model.state_dict()
    assert sd.keys() == before.keys() and all(torch.equal(sd[k], before[k]) for k in sd)
    assert not model.model.layers[0]._forward_pre_hooks and not model.model._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_kv_cache_generation_equals_no_cache(tiny_base, experts, granularity):
    spec = _spec(tiny_base, experts, knowledge="null", routing=Routing(granularity, temperature=0.5))
    torch.manual_seed(3)
    for lay in spec.layers.values():
        lay.router_weight.normal_(std=2.0)  # sharp, input-dependent routing: a wrong mixture changes tokens
    model = attach_moe(_base(tiny_base), spec)
    # a left-padded batch of two prompts of different lengths
    ids = _ids(2, 9, seed=5)
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
        single = model.generate(ids[1:], attention_mask=mask[1:], use_cache=True, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[1], single[0])  # the padded neighbour does not change routing


def test_sequence_routing_reuses_prompt_mixture_in_decode(tiny_base, experts):
    spec = _spec(tiny_base, experts, routing=Routing("sequence"))
    for lay in spec.layers.values():
        lay.router_weight.normal_(std=2.0)
    model = attach_moe(_base(tiny_base), spec)
    ids = _ids(1, 8, seed=7)
    with torch.no_grad(), record_routing(model) as rec:
        model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for L, recs in rec.records.items():
        assert len(recs) == 5  # prefill + 4 decode steps
        assert all(torch.equal(recs[0][0], r[0]) for r in recs), L


def test_recorder_and_expert_means(tiny_base, experts):
    spec = _spec(tiny_base, experts, knowledge="null")
    model = attach_moe(_base(tiny_base), spec)
    with torch.no_grad(), record_routing(model) as rec:
        model(_ids())
    means = rec.expert_means()
    assert set(means) == set(spec.layers)
    for d in means.values():  # zero routers: uniform over the 4 slots
        assert set(d) == {"diagnosis", "ddi", "summary", "null"}
        assert all(abs(v - 0.25) < 1e-6 for v in d.values())
    with torch.no_grad(), force_mixture(model, {"ddi": 1.0}), record_routing(model) as rec:
        model(_ids())
    assert all(d["ddi"] == 1.0 and d["diagnosis"] == 0.0 for d in rec.expert_means().values())


def test_router_training_gradients_and_extract(tiny_base, experts):
    spec = _spec(tiny_base, experts, routing=Routing("token"))
    model = attach_moe(_base(tiny_base), spec)
    params = moe_parameters(model)
    for p in model.parameters():
        if all(p is not q for q in params):
            p.requires_grad_(False)
    opt = torch.optim.SGD(params, lr=0.5)
    ids = _ids()
    out = model(ids, labels=ids)
    out.loss.backward()
    rt_router = model.model.layers[1].moe_router.linear.weight
    assert rt_router.grad is not None and rt_router.grad.abs().sum() > 0
    assert model.model.layers[1].self_attn.q_proj.rho.grad.abs().sum() > 0
    assert model.model.layers[1].self_attn.q_proj.A.grad is None
    opt.step()
    new = extract_spec(model)
    assert not torch.equal(new.layers[1].router_weight, spec.layers[1].router_weight)
    assert torch.equal(new.modules["model.layers.0.self_attn.q_proj"].A, spec.modules["model.layers.0.self_attn.q_proj"].A)


@pytest.mark.parametrize("arch,targets", [("mistral", ["q_proj", "down_proj"]), ("qwen2", ["k_proj", "up_proj"]),
                                          ("phi3", ["qkv_proj", "gate_up_proj"]), ("gpt2", ["c_attn", "c_proj", "c_fc"])])
def test_families_forced_parity(tiny_base_factory, tmp_path, arch, targets):
    base = tiny_base_factory(arch)
    a = make_peft_adapter(base, tmp_path / "a", r=4, targets=targets, seed=1, scale=0.3)
    b = make_peft_adapter(base, tmp_path / "b", r=2, targets=targets[:1], seed=2, scale=0.3)
    spec = MoeSpec.from_experts(str(base), "", {"a": read_adapter(a), "b": read_adapter(b)}, hidden_size=64, model_type=arch)
    model = attach_moe(_base(base), spec)
    ids = _ids()
    peft = PeftModel.from_pretrained(_base(base), a).eval()
    with torch.no_grad(), force_mixture(model, {"a": 1.0}):
        assert torch.allclose(model(ids).logits, peft(ids).logits, atol=1e-5, rtol=1e-4)
        assert torch.equal(model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False),
                           model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False, use_cache=False))


def test_attach_errors(tiny_base, tiny_base_factory, experts):
    spec = _spec(tiny_base, experts)
    model = attach_moe(_base(tiny_base), spec)
    with pytest.raises(CheckpointError, match="already attached"):
        attach_moe(model, spec)
    with pytest.raises(ValidationError, match="unknown expert"):
        with force_mixture(model, {"radiology": 1.0}):
            pass
    wide = _base(tiny_base_factory("llama", hidden=96))
    with pytest.raises(BaseMismatchError, match="hidden size"):
        attach_moe(wide, spec)
    gpt2 = _base(tiny_base_factory("gpt2"))
    with pytest.raises(ValidationError, match="not found"):
        attach_moe(gpt2, spec)
    assert not is_attached(gpt2) and not is_attached(wide)


def test_positional_mask_and_no_stale_mixture(tiny_base, experts):
    """The decoder stack called with a positional attention mask routes like the keyword call; no mixture is kept."""
    spec = _spec(tiny_base, experts, routing=Routing("sequence"))
    for lay in spec.layers.values():
        lay.router_weight.normal_(std=2.0)
    model = attach_moe(_base(tiny_base), spec)
    ids = _ids(2, 8, seed=9)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with torch.no_grad():
        kw = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        pos = model.model(ids, mask).last_hidden_state
        nomask = model.model(ids).last_hidden_state
    assert torch.allclose(kw, pos, atol=1e-6)
    assert not torch.allclose(kw[0, :5], nomask[0, :5], atol=1e-4)  # the mask matters for row 0
    assert all(model.model.layers[L].moe_router.pi is None for L in spec.layers)
