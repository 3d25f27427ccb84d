"""Allocation: slots per layer, clustering by delta similarity, spec building ([1, all] schedule, exact concat)."""

from __future__ import annotations

import torch

from mergekit_moe.lora import Adapter, LoraFactors
from mergekit_moe.moe.allocate import allocate, build_spec, cluster, layer_similarity, slots_per_layer

MODS = ["q_proj", "v_proj"]


def adapter(seed: int, layers: int = 4, r: int = 2, hidden: int = 16, base=None, noise: float = 1.0) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    f = {}
    for L in range(layers):
        for m in MODS:
            name = f"model.layers.{L}.self_attn.{m}"
            A = torch.randn(r, hidden, generator=g) * noise
            B = torch.randn(hidden, r, generator=g) * noise
            if base is not None:  # a near-copy of another expert: highly similar delta
                A, B = base.factors[name].A + A, base.factors[name].B + B
            f[name] = LoraFactors(name, A, B, 2.0)
    return Adapter({"r": r}, f)


def test_slots_per_layer_schedules_and_profiles():
    assert slots_per_layer(4, 3, schedule=[1, "all"]) == [1, 1, 3, 3]
    assert slots_per_layer(8, 4, schedule=[1, 2, 4, "all"]) == [1, 1, 2, 2, 4, 4, 4, 4]
    assert slots_per_layer(5, 4, profile="increasing", min_slots=1, max_slots="all") == [1, 2, 2, 3, 4]
    assert slots_per_layer(3, 4, profile="constant", max_slots=2) == [2, 2, 2]


def test_similarity_from_factors_matches_dense_cosine():
    a, b = adapter(0), adapter(1)
    mods = [m for m in a.factors if ".layers.0." in m]
    sim = layer_similarity([a, b], mods)
    da = torch.cat([a.factors[m].delta().flatten() for m in mods])
    db = torch.cat([b.factors[m].delta().flatten() for m in mods])
    assert abs(float(sim[0, 1]) - float(torch.nn.functional.cosine_similarity(da, db, dim=0))) < 1e-4
    assert abs(float(sim[0, 0]) - 1.0) < 1e-5


def test_cluster_groups_similar_experts_first():
    a = adapter(0)
    near_a = adapter(5, base=a, noise=0.05)
    b = adapter(1)
    alloc = allocate({"a": a, "b": b, "a2": near_a}, [2, 2, 2, 2])
    for L in range(4):
        assert sorted(map(sorted, alloc.clusters[L])) == [["a", "a2"], ["b"]]
    assert cluster(torch.eye(3), 3) == [[0], [1], [2]]


def test_schedule_one_then_all_merges_shallow_and_keeps_deep_separate_concat_exact():
    task = {"a": adapter(0), "b": adapter(1, r=3), "c": adapter(2)}
    slots = slots_per_layer(4, 3, schedule=[1, "all"])
    alloc = allocate(task, slots)
    assert alloc.clusters[0] == [["a", "b", "c"]] and alloc.clusters[1] == [["a", "b", "c"]]
    assert alloc.clusters[2] == [["a"], ["b"], ["c"]] and alloc.clusters[3] == [["a"], ["b"], ["c"]]
    spec = build_spec(task, alloc, base_model="x", base_fingerprint="f", hidden_size=16, knowledge_name="null",
                      merge_method="concat")
    assert [s.name for s in spec.layers[0].slots] == ["a+b+c", "null"]
    assert spec.layers[0].slots[0].method == "concat" and spec.layers[0].slots[1].method == "null"
    assert [s.name for s in spec.layers[3].slots] == ["a", "b", "c", "null"]
    # concat is exact: the shallow merged slot's B A is the mean of the three true deltas
    for m in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        ml = spec.modules[m]
        assert ml.rank == 2 + 3 + 2 and set(ml.slot_of_rank.tolist()) == {0}
        mean = sum(task[n].factors[m].delta() for n in "abc") / 3
        torch.testing.assert_close(ml.B @ ml.A, mean, rtol=1e-5, atol=1e-5)
    # deep layers keep each expert exact in its own slot
    m = "model.layers.3.self_attn.q_proj"
    ml = spec.modules[m]
    for s, n in enumerate("abc"):
        cols = ml.slot_of_rank == s
        torch.testing.assert_close(ml.B[:, cols] @ ml.A[cols], task[n].factors[m].delta(), rtol=1e-5, atol=1e-5)


def test_knowledge_expert_is_never_merged_into_a_task_cluster():
    task = {"a": adapter(0), "b": adapter(1)}
    k = adapter(9)
    alloc = allocate(task, [1, 1, 1, 1])
    spec = build_spec(task, alloc, base_model="x", base_fingerprint="f", hidden_size=16, knowledge=k, knowledge_name="general",
                      merge_method="ties")
    for L in range(4):
        assert [s.members for s in spec.layers[L].slots] == [["a", "b"], ["general"]]
    m = "model.layers.2.self_attn.v_proj"
    ml = spec.modules[m]
    cols = ml.slot_of_rank == 1
    torch.testing.assert_close(ml.B[:, cols] @ ml.A[cols], k.factors[m].delta(), rtol=1e-5, atol=1e-5)
    assert spec.experts["general"].role == "knowledge"
