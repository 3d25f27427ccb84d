"""``moemerge eval`` end to end on a tiny Llama: a LoRA trained in the test, a real bundle in the
registry, a composed checkpoint with routers, and the CLI as a subprocess."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import make_peft_adapter, run_cli
from mergekit_moe import metrics as M
from mergekit_moe.errors import BaseMismatchError, DataError
from mergekit_moe.eval_data import load_eval_rows, reference_answers
from mergekit_moe.eval_target import load_target
from mergekit_moe.evaluate import EvalConfig, evaluate, generate, write_outputs

LABELS = ["pneumonia", "asthma", "meningitis"]
SYMPTOMS = ["fever and cough", "wheeze and tight chest", "stiff neck and headache"]
PNG = b"\x89PNG\r\n\x1a\n"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _dx_rows(n: int, prefix: str) -> list[dict]:
    return [{"id": f"{prefix}{i}", "task": "dx", "prompt": f"Symptoms: {SYMPTOMS[i % 3]}. Diagnosis?",
             "response": LABELS[i % 3]} for i in range(n)]


@pytest.fixture(scope="module")
def toy(tmp_path_factory, tiny_base):
    """Data dir (dx: train/test, general: test probes + a text row) and a LoRA trained on dx."""
    from peft import LoraConfig, get_peft_model

    from mergekit_moe.base import load_base
    from mergekit_moe.data import collate, tokenize_example

    root = tmp_path_factory.mktemp("toy")
    data = root / "data"
    _write_jsonl(data / "dx" / "train.jsonl", _dx_rows(12, "tr"))
    _write_jsonl(data / "dx" / "test.jsonl", _dx_rows(6, "te"))
    general = [{"id": f"g{i}", "prompt": f"What is {i} plus {i}?", "response": f"{2 * i}"} for i in range(4)]
    general.append({"id": "gtext", "text": "Water boils at 100 degrees Celsius at sea level."})
    _write_jsonl(data / "general" / "test.jsonl", general)  # no task field: the folder names the task

    torch.manual_seed(0)
    model, tok = load_base(tiny_base)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    batch = collate([tokenize_example(r, tok, 64)[0] for r in _dx_rows(12, "tr")], tok.pad_token_id)
    for _ in range(120):
        loss = peft(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    peft.save_pretrained(root / "dx_lora")
    make_peft_adapter(tiny_base, root / "other_lora", targets=["q_proj", "v_proj"], seed=3, scale=0.2)
    return {"root": root, "data": data, "lora": root / "dx_lora", "other": root / "other_lora"}


def test_rows_from_directory_and_probe_file(toy, tmp_path):
    rows = load_eval_rows(toy["data"])
    assert [r["task"] for r in rows].count("dx") == 6 and [r["task"] for r in rows].count("general") == 5
    probe = tmp_path / "probes.jsonl"
    _write_jsonl(probe, [{"prompt": "Capital of France?", "response": "Paris", "task": "geo"}])
    rows = load_eval_rows(toy["data"] / "dx", probe=probe, limit=2)
    assert [(r["task"], r.get("probe", False)) for r in rows] == [("dx", False), ("dx", False), ("general", True)]
    # an explicit split on a file picks its sibling; a missing one is one error naming the folder
    assert {r["id"] for r in load_eval_rows(toy["data"] / "dx" / "train.jsonl", "test")} == {f"te{i}" for i in range(6)}
    # split files named after their task: dx_train.jsonl -> dx_test.jsonl
    _write_jsonl(tmp_path / "own" / "dx_train.jsonl", _dx_rows(4, "a"))
    _write_jsonl(tmp_path / "own" / "dx_test.jsonl", _dx_rows(2, "b"))
    assert [r["id"] for r in load_eval_rows(tmp_path / "own" / "dx_train.jsonl", "test")] == ["b0", "b1"]
    with pytest.raises(DataError, match="no validation split") as e:
        load_eval_rows(toy["data"] / "dx" / "train.jsonl", "validation")
    assert "\n" not in str(e.value)


def test_training_answers_decide_the_metric(toy, tiny_base):
    ref = reference_answers(toy["data"])
    assert len(ref["dx"]) == 12 and "general" not in ref  # general has no train split: skipped, not an error
    assert reference_answers(toy["data"], "train") == {}
    rows = [r for r in load_eval_rows(toy["data"], limit=2) if r["task"] == "dx"]
    # two rows alone are too few to tell a label set; the training answers show one
    assert M.choose_metric([r["response"] for r in rows])[0] == M.ROUGE_L
    res = evaluate(load_target(None, base=str(tiny_base)), rows, EvalConfig(retention=False), reference=ref)
    assert res.tasks["dx"]["metric"] == M.ACCURACY and res.tasks["dx"]["labels"] == sorted(LABELS)
    assert res.tasks["dx"]["label_mode"] == "full" and res.settings["reference_answers"] == {"dx": 12}


def test_rows_from_recipe(toy, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
base_model: tiny
experts:
  - name: dx_expert
    train: {{data: {toy['data'] / 'dx' / 'train.jsonl'}, task: dx}}
knowledge_expert:
  name: general_expert
  train: {{data: {toy['data'] / 'general'}}}
output: {{path: out}}
""", encoding="utf-8")
    rows = load_eval_rows(recipe)
    assert {(r["task"], r.get("expert")) for r in rows} == {("dx", "dx_expert"), ("general", None)}
    assert len(rows) == 11
    with pytest.raises(DataError, match=r"experts\[0\] \(dx_expert\)"):
        load_eval_rows(recipe, "validation")


def test_adapter_beats_base_and_retention_uses_exact_base(toy, tiny_base):
    rows = load_eval_rows(toy["data"])
    base_res = evaluate(load_target(None, base=str(tiny_base)), rows)
    tgt = load_target(str(toy["lora"]), base=str(tiny_base))
    res = evaluate(tgt, rows)

    dx_b, dx_t = base_res.tasks["dx"], res.tasks["dx"]
    assert dx_t["metric"] == "accuracy" and dx_t["labels"] == sorted(LABELS)
    assert dx_t["score"] == 1.0 and dx_b["score"] < 1.0  # the trained LoRA answers, the random base does not
    assert dx_t["loss"] < dx_b["loss"]
    assert base_res.tasks["general"]["metric"] == "rougeL"
    assert res.average == pytest.approx(dx_t["score"])  # general is not part of the task average
    assert tgt.adapter_params == sum(p.numel() for n, p in tgt.model.named_parameters() if "lora_" in n)

    ret = res.retention
    assert ret["n_probes"] == 4 and ret["kl"] > 0 and ret["n_tokens"] > 0
    # base_mode is exactly the base: its perplexity equals the bare base's loss on the same rows
    assert ret["base_ppl"] == pytest.approx(math.exp(base_res.tasks["general"]["loss"]), rel=1e-4)
    assert ret["target_ppl"] == pytest.approx(math.exp(res.tasks["general"]["loss"]), rel=1e-4)
    assert ret["ppl_ratio"] == pytest.approx(ret["target_ppl"] / ret["base_ppl"], rel=1e-4)
    assert base_res.retention["kl"] == 0.0 and base_res.routing is None

    # predictions carry what is needed to recompute every score
    preds = [p for p in res.predictions if p["task"] == "dx"]
    assert {"id", "task", "prompt", "prediction", "gold", "score"} <= set(preds[0])
    assert "<|im_start|>assistant" in preds[0]["prompt"]  # the chat template was applied
    metric, labels = dx_t["metric"], M.LabelSet(tuple(dx_t["labels"]), dx_t["label_mode"])
    assert M.mean([M.score_prediction(p["prediction"], p["gold"], metric, labels) for p in preds]) == dx_t["score"]

    # left-padded batches give the same greedy answers as one row at a time
    dx_rows = [r for r in rows if r["task"] == "dx"]
    batched = generate(tgt.model, tgt.tokenizer, dx_rows, max_new_tokens=6, batch_size=6, max_length=128)
    single = [generate(tgt.model, tgt.tokenizer, [r], max_new_tokens=6, batch_size=1, max_length=128)[0] for r in dx_rows]
    assert batched == single


def _spec(toy, tiny_base, granularity="token"):
    from mergekit_moe.base import fingerprint_of
    from mergekit_moe.lora import read_adapter
    from mergekit_moe.moe.spec import MoeSpec, Routing

    return MoeSpec.from_experts(str(tiny_base), fingerprint_of(tiny_base),
                                {"dx": read_adapter(toy["lora"]), "other": read_adapter(toy["other"])},
                                hidden_size=64, knowledge="null", routing=Routing(granularity=granularity))


def test_sequence_routing_weights_per_row(toy, tiny_base, tmp_path):
    from mergekit_moe.checkpoint import save_checkpoint

    spec = _spec(toy, tiny_base, "sequence")
    torch.manual_seed(1)
    for lay in spec.layers.values():
        lay.router_weight = torch.randn_like(lay.router_weight)
    save_checkpoint(spec, tmp_path / "ckpt")
    rows = load_eval_rows(toy["data"], limit=3)
    res = evaluate(load_target(str(tmp_path / "ckpt")), rows, EvalConfig(retention=False))
    rt = res.routing
    assert set(rt["mean_weight"]) == {"dx", "general"}
    for per_layer in rt["mean_weight"]["dx"]:
        assert sum(per_layer) == pytest.approx(1.0, abs=1e-5)
    assert 0.0 <= rt["accuracy"] <= 1.0 and set(rt["per_task_accuracy"]) == {"dx", "general"}


def test_checkpoint_routing_analysis(toy, tiny_base, tmp_path):
    from mergekit_moe.checkpoint import save_checkpoint

    spec = _spec(toy, tiny_base)
    for lay in spec.layers.values():  # a router that always picks the dx expert
        lay.router_bias = torch.tensor([6.0, 0.0, 0.0])
    ckpt = save_checkpoint(spec, tmp_path / "ckpt") or tmp_path / "ckpt"
    rows = load_eval_rows(toy["data"])
    tgt = load_target(str(ckpt), base=str(tiny_base))
    res = evaluate(tgt, rows)

    rt = res.routing
    assert rt["experts"] == ["dx", "other", "null"] and rt["layers"] == [0, 1, 2, 3]
    assert rt["expert_tasks"]["null"] == "general"
    for task in ("dx", "general"):
        assert len(rt["mean_weight"][task]) == 4
        for per_layer in rt["mean_weight"][task]:
            assert sum(per_layer) == pytest.approx(1.0, abs=1e-5) and per_layer[0] > 0.9
    assert rt["per_task_accuracy"] == {"dx": 1.0, "general": 0.0}
    assert rt["accuracy"] == pytest.approx(6 / 11)  # 6 dx rows right, 5 general rows (4 probes + text) wrong
    assert res.tasks["dx"]["score"] == 1.0  # nearly all weight on the trained expert
    base_loss = evaluate(load_target(None, base=str(tiny_base)), rows, EvalConfig(retention=False)).tasks["general"]["loss"]
    assert res.retention["base_ppl"] == pytest.approx(math.exp(base_loss), rel=1e-4)

    paths = write_outputs(res, tmp_path / "out")
    assert paths["routing_heatmap.png"].read_bytes()[:8] == PNG
    saved = json.loads(paths["scores.json"].read_text())
    assert saved["routing"]["per_task_accuracy"]["dx"] == 1.0
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]


def test_wrong_base_for_plain_adapter(toy, tiny_base_factory):
    other = tiny_base_factory("llama", hidden=32, layers=2)
    with pytest.raises(BaseMismatchError, match="does not fit the base"):
        load_target(str(toy["lora"]), base=str(other))


def test_cli_eval_bundle_from_registry(toy, tiny_base, tiny_base_factory, tmp_path):
    from mergekit_moe.base import fingerprint_of
    from mergekit_moe.bundle import ExpertMeta, write_bundle
    from mergekit_moe.registry import Registry

    meta = ExpertMeta(name="dx-expert", task="dx", base_model=str(tiny_base), base_fingerprint=fingerprint_of(tiny_base))
    Registry().add(write_bundle(tmp_path / "bundle", toy["lora"], meta).path)

    out = tmp_path / "out"
    proc = run_cli("eval", "dx-expert", "--data", toy["data"], "--metric", "dx=rougeL", "--out", out, check=True)
    assert "dx" in proc.stdout and "retention" in proc.stdout and "scores.json" in proc.stdout
    scores = json.loads((out / "scores.json").read_text())
    assert scores["target"]["kind"] == "bundle" and scores["tasks"]["dx"]["metric"] == "rougeL"
    assert scores["settings"]["reference_answers"] == {"dx": 12}
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 10 and {p["task"] for p in preds} == {"dx", "general"}
    dx = [p for p in preds if p["task"] == "dx"]
    assert scores["tasks"]["dx"]["score"] == pytest.approx(M.mean([M.rouge_l(p["prediction"], p["gold"]) for p in dx]))
    assert (out / "task_scores.png").read_bytes()[:8] == PNG

    # a base with another fingerprint: one line, non-zero, nothing written
    other = tiny_base_factory("llama", hidden=32, layers=2)
    bad = run_cli("eval", "dx-expert", "--base", other, "--data", toy["data"], "--out", tmp_path / "bad")
    assert bad.returncode == 1 and "fingerprint" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_cli_usage_and_missing_split_errors(toy, tmp_path, capsys):
    from mergekit_moe.cli import main

    for argv, text, code in (
            (["eval", "x", "--data", "d.jsonl", "--metric", "dx=bleu"], "TASK=METRIC", 2),
            (["eval", "--data", "d.jsonl"], "nothing to evaluate", 2),
            # a missing split: one line naming it, before any model is loaded, nothing written
            (["eval", "dx-expert", "--data", str(toy["data"] / "dx"), "--split", "validation", "--out", str(tmp_path / "m")],
             "no validation split", 1)):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == code and text in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()
