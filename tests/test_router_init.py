"""Router init: arrow (top right singular vectors, no data), hidden (prompt states), uniform, random."""

from __future__ import annotations

import torch

from helpers import make_peft_adapter
from mergekit_moe.lora import Adapter, LoraFactors, read_adapter
from mergekit_moe.moe.allocate import allocate, build_spec
from mergekit_moe.moe.spec import Routing
from mergekit_moe.moe.router import (apply_router_init, arrow_init, arrow_vectors, hidden_init, layer_inputs, random_init, stats,
                                     uniform_init)
from mergekit_moe.progress import NullReporter

TASKS = {
    "diag": ["Symptoms: fever, cough. Diagnosis?", "Symptoms: headache, stiff neck. Diagnosis?",
             "Symptoms: chest pain. Diagnosis?", "Symptoms: rash, fever. Diagnosis?"],
    "summ": ["Summarize the report. Findings: mild cardiomegaly.", "Summarize the report. Findings: no effusion.",
             "Summarize the report. Findings: stable nodule.", "Summarize the report. Findings: clear lungs."],
    "ddi": ["Drug pair: warfarin + aspirin. Interaction?", "Drug pair: simvastatin + clarithromycin. Interaction?",
            "Drug pair: lisinopril + potassium. Interaction?", "Drug pair: metformin + contrast. Interaction?"],
}
HELD_OUT = {"diag": "Symptoms: photophobia, fever. Diagnosis?", "summ": "Summarize the report. Findings: small effusion.",
            "ddi": "Drug pair: clopidogrel + omeprazole. Interaction?"}


def synthetic(hidden: int, direction: int, seed: int) -> Adapter:
    """One rank-1 expert per layer whose delta's top right singular vector is e_direction."""
    g = torch.Generator().manual_seed(seed)
    f = {}
    for L in range(2):
        name = f"model.layers.{L}.self_attn.q_proj"
        A = torch.zeros(1, hidden)
        A[0, direction] = 1.0
        f[name] = LoraFactors(name, A, torch.randn(hidden, 1, generator=g), 1.0)
    return Adapter({"r": 1}, f)


def test_arrow_vectors_are_the_top_right_singular_vectors():
    task = {"a": synthetic(16, 3, 0), "b": synthetic(16, 7, 1)}
    spec = build_spec(task, allocate(task, [2, 2]), base_model="x", base_fingerprint="f", hidden_size=16, knowledge_name="null")
    vs = arrow_vectors(spec, 0)
    assert vs[2] is None  # the null knowledge slot has no delta
    assert abs(abs(float(vs[0][3])) - 1) < 1e-5 and abs(abs(float(vs[1][7])) - 1) < 1e-5
    st = {L: stats({L: torch.randn(8, 16, generator=torch.Generator().manual_seed(L))})[L] for L in (0, 1)}
    routers = arrow_init(spec, st)
    W, b = routers[0]
    assert W.shape == (3, 16) and b.shape == (3,)
    assert torch.all(W[2] == 0) and float(b[2]) == 0  # null slot: logit 0, the reference
    assert W[0].abs().argmax() == 3 and W[1].abs().argmax() == 7


def test_hidden_init_routes_held_out_prompts_to_their_expert(tiny_base, tmp_path):
    from mergekit_moe.base import load_base
    from mergekit_moe.moe.attach import attach_moe
    from mergekit_moe.moe.routing import record_routing

    model, tok = load_base(tiny_base)
    # small deltas, like trained experts: the states deeper routers see stay close to the base's
    task = {n: read_adapter(make_peft_adapter(tiny_base, tmp_path / n, seed=i, scale=0.05)) for i, n in enumerate(TASKS)}
    spec = build_spec(task, allocate(task, [3] * 4), base_model=str(tiny_base), base_fingerprint="f", hidden_size=64,
                      knowledge_name="null", routing=Routing(granularity="sequence"))
    # sequence routing reads the mean prompt state: the init uses the same pooling
    states = {n: layer_inputs(model, tok, p, pool="mean") for n, p in TASKS.items()}
    rep = NullReporter()
    apply_router_init(spec, hidden_init(spec, states, reporter=rep))
    assert not rep.warnings
    attach_moe(model, spec)
    for i, (name, prompt) in enumerate(HELD_OUT.items()):
        enc = tok(prompt, return_tensors="pt")
        with record_routing(model) as rec, torch.no_grad():
            model(**enc)
        means = rec.expert_means()
        avg = {e: sum(means[L][e] for L in means) / len(means) for e in spec.experts}
        assert max(avg, key=avg.get) == name, (name, avg)
        assert avg[name] > 1 / 4 + 0.15  # well above chance over 4 slots


def test_hidden_init_warns_when_prompt_vectors_coincide(tiny_base, tmp_path):
    from mergekit_moe.base import load_base

    model, tok = load_base(tiny_base)
    task = {n: read_adapter(make_peft_adapter(tiny_base, tmp_path / n, seed=i)) for i, n in enumerate(("a", "b", "c"))}
    spec = build_spec(task, allocate(task, [3] * 4), base_model="x", base_fingerprint="f", hidden_size=64)
    same = layer_inputs(model, tok, TASKS["diag"])
    states = {"a": same, "b": same, "c": layer_inputs(model, tok, TASKS["ddi"])}
    rep = NullReporter()
    hidden_init(spec, states, reporter=rep)
    assert any("'a' and 'b'" in w and "nearly identical" in w for w in rep.warnings)
    assert not any("'c'" in w for w in rep.warnings)


def test_uniform_and_random_inits():
    task = {"a": synthetic(16, 3, 0), "b": synthetic(16, 7, 1)}
    spec = build_spec(task, allocate(task, [2, 2]), base_model="x", base_fingerprint="f", hidden_size=16)
    u = uniform_init(spec)
    assert all(torch.all(W == 0) for W, _ in u.values())
    st = {L: stats({L: torch.randn(4, 16)})[L] for L in (0, 1)}
    r1, r2 = random_init(spec, st, seed=3), random_init(spec, st, seed=3)
    assert all(torch.equal(r1[L][0], r2[L][0]) for L in r1)
    assert not torch.equal(r1[0][0], random_init(spec, st, seed=4)[0][0])
