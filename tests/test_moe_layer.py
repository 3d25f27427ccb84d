"""The MoE-LoRA layer equals an explicit loop ``W x + sum_i pi_i s_i B_i A_i x`` (token/sequence, padding, top-k, bf16)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_peft_adapter
from torch import nn
from transformers import AutoModelForCausalLM

from mergekit_moe.lora import read_adapter
from mergekit_moe.moe.attach import attach_moe
from mergekit_moe.moe.layer import LayerRouter, MoeLoraLinear, RoutingState
from mergekit_moe.moe.routing import force_mixture, record_routing
from mergekit_moe.moe.spec import MoeSpec, Routing


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    d = tmp_path_factory.mktemp("layer-experts")
    paths = {
        "a": make_peft_adapter(tiny_base, d / "a", r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], seed=11, scale=0.3),
        "b": make_peft_adapter(tiny_base, d / "b", r=2, alpha=2, targets=["q_proj", "up_proj"], seed=12, scale=0.3),
        "c": make_peft_adapter(tiny_base, d / "c", r=6, alpha=3, targets=["v_proj", "down_proj"], seed=13, scale=0.3,
                               use_rslora=True),
    }
    return {n: read_adapter(p) for n, p in paths.items()}


def _model(base, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(base, dtype=dtype).eval()


def _spec(base, adapters, routing, *, seed=0, bias=True):
    spec = MoeSpec.from_experts(str(base), "", adapters, hidden_size=64, routing=routing)
    g = torch.Generator().manual_seed(seed)
    for lay in spec.layers.values():
        lay.router_weight.copy_(torch.randn(lay.router_weight.shape, generator=g))
        if bias:
            lay.router_bias = torch.randn(lay.n_slots, generator=g)
    return spec


def _ref_pi(h, W, b, routing: Routing, mask):
    """Reference router: (B, T, S) token mixture or (B, 1, S) sequence mixture, in float32."""
    h = h.float()
    if routing.granularity == "sequence":
        m = mask.float().unsqueeze(-1)
        h = ((h * m).sum(1) / m.sum(1)).unsqueeze(1)
    logits = (h @ W.float().T + (0 if b is None else b.float())) / routing.temperature
    pi = torch.softmax(logits, -1)
    if routing.top_k is not None:
        top = pi.topk(routing.top_k, -1)
        pi = torch.zeros_like(pi).scatter(-1, top.indices, top.values)
        pi = pi / pi.sum(-1, keepdim=True)
    return pi


def _check_against_loop(model, spec, adapters, ids, mask, atol=1e-5):
    """Run the model once; for every target module compare its output with the explicit per-expert loop."""
    hidden, io, handles = {}, {}, []
    for L in spec.layers:
        block = model.model.layers[L]
        handles.append(block.register_forward_pre_hook(lambda m, a, kw, L=L: hidden.__setitem__(L, (a[0] if a else kw["hidden_states"]).detach()),
                                                       with_kwargs=True))
    for name in spec.modules:
        mod = model.get_submodule(name)
        assert isinstance(mod, MoeLoraLinear)
        handles.append(mod.register_forward_hook(lambda m, a, out, name=name: io.__setitem__(name, (a[0].detach(), out.detach()))))
    with torch.no_grad():
        model(ids, attention_mask=mask)
    for h in handles:
        h.remove()
    names = list(adapters)
    checked = 0
    for name in spec.modules:
        L = spec.layer_of(name)
        lay = spec.layers[L]
        x, y = io[name]
        pi = _ref_pi(hidden[L], lay.router_weight, lay.router_bias, spec.routing, mask)
        with torch.no_grad():
            ref = model.get_submodule(name).base_layer(x).float()
            for i, n in enumerate(names):
                f = adapters[n].factors.get(name)
                if f is not None:  # an expert missing at a module contributes nothing there
                    ref = ref + pi[..., i:i + 1] * f.scale * ((x.float() @ f.A.T) @ f.B.T)
        assert torch.allclose(y.float(), ref, atol=atol, rtol=1e-4), name
        checked += 1
    assert checked == len(spec.modules) > 0


@pytest.mark.parametrize("routing", [Routing("token"), Routing("sequence"), Routing("token", temperature=0.7, top_k=2),
                                     Routing("sequence", temperature=2.0, top_k=1)], ids=["token", "sequence", "token-top2", "seq-top1"])
def test_layer_equals_explicit_loop_with_padding(tiny_base, adapters, routing):
    spec = _spec(tiny_base, adapters, routing, seed=1)
    model = attach_moe(_model(tiny_base), spec)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 300, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0   # right padding
    mask[1, :4] = 0   # left padding
    _check_against_loop(model, spec, adapters, ids, mask)


def test_routing_is_input_dependent_and_topk_sparse(tiny_base, adapters):
    spec = _spec(tiny_base, adapters, Routing("token", top_k=1), seed=3)
    model = attach_moe(_model(tiny_base), spec)
    with torch.no_grad(), record_routing(model) as rec:
        model(torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(4)))
    for L, pi in rec.weights().items():
        assert pi.shape == (2, 12, 3)
        assert torch.all((pi == 0) | (pi == 1)) and torch.allclose(pi.sum(-1), torch.ones(2, 12))
    # different tokens pick different experts somewhere (the router reads the hidden state)
    assert any(len(set(pi.argmax(-1).flatten().tolist())) > 1 for pi in rec.weights().values())


def test_sequence_routing_ignores_padding(tiny_base, adapters):
    """A right-padded row gives the same logits at its real positions as the row alone (mask respected)."""
    spec = _spec(tiny_base, adapters, Routing("sequence"), seed=5)
    model = attach_moe(_model(tiny_base), spec)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(3, 300, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    ids[0, 5:] = 0
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        alone = model(ids[:1, :5]).logits
    assert torch.allclose(batch[0, :5], alone[0], atol=1e-5)


def test_bf16_path_close_to_fp32(tiny_base, adapters):
    spec = _spec(tiny_base, adapters, Routing("token"), seed=7)
    ids = torch.randint(3, 300, (2, 8), generator=torch.Generator().manual_seed(8))
    m32 = attach_moe(_model(tiny_base), spec)
    m16 = attach_moe(_model(tiny_base, torch.bfloat16), spec)
    q = m16.model.layers[0].self_attn.q_proj
    assert q.A.dtype == torch.bfloat16 and q.B.dtype == torch.bfloat16
    assert m16.model.layers[0].moe_router.linear.weight.dtype == torch.float32  # routers stay fp32
    with torch.no_grad():
        l32, l16 = m32(ids).logits, m16(ids).logits
        assert l16.dtype == torch.bfloat16
        assert torch.isfinite(l16).all()
        assert (l16.float() - l32).abs().max() < 0.05 * l32.abs().max()
        with force_mixture(m16, {"a": 1.0}):
            out = m16.generate(ids[:1], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 11)


def test_module_alone_grad_and_inference_paths_agree():
    """Inference (in-place addmm) and autograd paths give the same output; 2-D inputs work with a forced mixture."""
    torch.manual_seed(0)
    base = nn.Linear(16, 24)
    A, B = torch.randn(5, 16), torch.randn(24, 5)
    slot = torch.tensor([0, 0, 1, 1, 1])
    state = RoutingState()
    router = LayerRouter(0, torch.randn(2, 16), None, Routing("token"), state)
    mod = MoeLoraLinear(base, A, B, slot, torch.rand(5) + 0.5, router)
    x = torch.randn(3, 7, 16)
    router.compute(x)
    with torch.no_grad():
        y_inf = mod(x)
    mod.rho.requires_grad_(True)
    y_grad = mod(x)
    y_grad.sum().backward()
    assert torch.allclose(y_inf, y_grad, atol=1e-5) and mod.rho.grad is not None and router.linear.weight.grad is not None
    g = router.pi[..., slot] * mod.rho.detach()
    ref = base(x) + ((x @ A.T) * g) @ B.T
    assert torch.allclose(y_inf, ref, atol=1e-5)
    state.forced = {0: torch.tensor([0.25, 0.75])}
    x2 = torch.randn(4, 16)
    router.compute(x2)
    with torch.no_grad():
        ref2 = base(x2) + ((x2 @ A.T) * (torch.tensor([0.25, 0.75])[slot] * mod.rho)) @ B.T
        assert torch.allclose(mod(x2), ref2, atol=1e-5)


def test_topk_is_exact_under_ties():
    """A zero router (all logits equal) with top_k=2 still keeps exactly two slots, each weight 1/2."""
    r = LayerRouter(0, torch.zeros(4, 8), None, Routing("token", top_k=2), RoutingState())
    pi = r.probs(torch.randn(3, 5, 8))
    assert torch.equal((pi > 0).sum(-1), torch.full((3, 5), 2))
    assert torch.allclose(pi.sum(-1), torch.ones(3, 5)) and torch.allclose(pi.max(-1).values, torch.full((3, 5), 0.5))


@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_forward_cost_does_not_grow_with_experts(granularity):
    """No loop over experts: the ops a module + router run are the same for 2 and for 8 experts."""
    from torch.profiler import ProfilerActivity, profile

    def ops(n_experts: int) -> list[str]:
        torch.manual_seed(0)
        state = RoutingState()
        router = LayerRouter(0, torch.randn(n_experts, 32), None, Routing(granularity), state)
        slot = torch.arange(n_experts).repeat_interleave(4)
        mod = MoeLoraLinear(nn.Linear(32, 48), torch.randn(4 * n_experts, 32), torch.randn(48, 4 * n_experts), slot,
                            torch.ones(4 * n_experts), router)
        x = torch.randn(2, 5, 32)
        with torch.no_grad():
            router.compute(x)
            mod(x)  # warm the cached expansion
            state.seq_cache.clear()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                router.compute(x)
                mod(x)
        return sorted(e.key for e in prof.key_averages() for _ in range(e.count) if e.key.startswith("aten::"))

    assert ops(2) == ops(8)
