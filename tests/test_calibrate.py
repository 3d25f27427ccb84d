"""Calibration on a tiny model with 3 synthetic tasks that need different experts.

Each expert is a real PEFT LoRA trained for a few dozen steps on its own task (a task-specific
answer to task-specific prompts). After composing with calibration:
* routing puts most weight on the right expert for held-out inputs of each task;
* the composed model's per-task loss is close to each expert alone and better than the linear merge;
* on general inputs the knowledge path keeps the output close to the base (KL below the uncalibrated mixture).
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from mergekit_moe.compose import compose

WORDS = ["fever", "cough", "rash", "pain", "nausea", "report", "lung", "heart", "aspirin", "warfarin", "statin", "dose",
         "mild", "acute", "chronic", "left", "right", "upper", "lower", "stable"]
TASKS = {
    "diag": ("Symptoms: {a}, {b}. Diagnosis?", "pneumonia"),
    "summ": ("Summarize the report. Findings: {a} {b}.", "impression stable"),
    "ddi": ("Drug pair: {a} + {b}. Interaction?", "major bleeding risk"),
}
GENERAL = ["What is the capital of France? Paris.", "Water boils at 100 degrees Celsius.", "The sky is blue today.",
           "List three prime numbers: 2, 3, 5.", "A cat sat on the mat.", "Please answer the question below."]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: one thread is faster than two fighting over a shared CPU (and results stay reproducible)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def task_rows(task: str, n: int, seed: int) -> list[dict]:
    rnd = random.Random(seed)
    tmpl, answer = TASKS[task]
    return [{"prompt": tmpl.format(a=rnd.choice(WORDS), b=rnd.choice(WORDS)), "response": answer} for _ in range(n)]


def general_rows(n: int, seed: int) -> list[dict]:
    rnd = random.Random(seed)
    return [{"text": f"{rnd.choice(GENERAL)} {rnd.choice(GENERAL)}"} for _ in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_tiny_expert(base_dir, rows, out_dir, *, steps: int = 40, seed: int = 0):
    """A real PEFT LoRA trained with plain torch for a few dozen steps (fast: tiny model, short rows)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mergekit_moe.base import load_tokenizer
    from mergekit_moe.data import collate, tokenize_rows

    torch.manual_seed(seed)
    tok = load_tokenizer(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    exs = tokenize_rows(rows, tok, 64).examples
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(exs), (8,), generator=g).tolist()
        b = collate([exs[i] for i in idx], tok.pad_token_id)
        loss = model(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def three_tasks(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("three-tasks")
    for i, t in enumerate(TASKS):
        rows = task_rows(t, 48, seed=i)
        train_tiny_expert(tiny_base, rows, root / f"expert-{t}", seed=i)
        write_jsonl(root / f"{t}.jsonl", rows)
        write_jsonl(root / f"{t}-heldout.jsonl", task_rows(t, 12, seed=100 + i))
    write_jsonl(root / "general.jsonl", general_rows(48, 7))
    write_jsonl(root / "general-heldout.jsonl", general_rows(12, 99))
    return root


def recipe_text(root, base, out: str, *, calibrate: bool = True) -> str:
    experts = "\n".join(f"  - {{name: {t}, source: ./expert-{t}, data: {t}.jsonl}}" for t in TASKS)
    cal = ("calibration: {general_data: general.jsonl, general_fraction: 0.25, steps: 80, lr: 0.05, batch_size: 8, "
           "max_length: 64, seed: 0}\n") if calibrate else ""
    return f"base_model: {base}\nexperts:\n{experts}\nrouting: {{init: hidden}}\n{cal}output: {{path: {out}}}\n"


def load_composed(path, base):
    from mergekit_moe.base import load_base
    from mergekit_moe.checkpoint import attach_moe, load_checkpoint

    model, tok = load_base(base)
    spec = load_checkpoint(path)
    attach_moe(model, spec, tokenizer=tok)
    return model, tok, spec


@torch.no_grad()
def answer_loss(model, tok, rows) -> float:
    from mergekit_moe.data import collate, tokenize_rows

    b = collate(tokenize_rows(rows, tok, 64).examples, tok.pad_token_id)
    return float(model(**b).loss)


@torch.no_grad()
def kl_to_base(model, tok, rows) -> float:
    from mergekit_moe.data import collate, tokenize_rows
    from mergekit_moe.moe.routing import force_mixture

    b = collate(tokenize_rows(rows, tok, 64).examples, tok.pad_token_id)
    b.pop("labels")
    lq = torch.log_softmax(model(**b).logits, -1)
    with force_mixture(model, {}):
        lp = torch.log_softmax(model(**b).logits, -1)
    m = b["attention_mask"].float()
    return float(((lp.exp() * (lp - lq)).sum(-1) * m).sum() / m.sum())


@pytest.fixture(scope="module")
def composed(three_tasks, tiny_base):
    """The calibrated composition, the uncalibrated mixture, and the linear-merge baseline, from one recipe."""
    f = three_tasks / "recipe.yaml"
    f.write_text(recipe_text(three_tasks, tiny_base, "./moe"))
    res = compose(f)
    g = three_tasks / "recipe-uncal.yaml"
    g.write_text(recipe_text(three_tasks, tiny_base, "./uniform", calibrate=False))
    compose(g, method="uniform")
    h = three_tasks / "recipe-linear.yaml"
    h.write_text(recipe_text(three_tasks, tiny_base, "./linear", calibrate=False))
    compose(h, method="linear")
    return res


def test_routing_prefers_the_right_expert_on_held_out_inputs(three_tasks, tiny_base, composed):
    from mergekit_moe.moe.routing import record_routing

    model, tok, spec = load_composed(three_tasks / "moe", tiny_base)
    for t in TASKS:
        rows = [json.loads(x) for x in (three_tasks / f"{t}-heldout.jsonl").read_text().splitlines()]
        with record_routing(model) as rec:
            answer_loss(model, tok, rows)
        means = rec.expert_means()
        avg = {e: sum(means[L][e] for L in means) / len(means) for e in spec.experts}
        assert max(avg, key=avg.get) == t, (t, avg)
        assert avg[t] > 0.5, (t, avg)  # chance is 1/4 (3 experts + the null knowledge slot)
    acc = composed.calibration["routing_accuracy_per_task"]
    assert all(a > 0.6 for a in acc.values()), acc


def test_composed_loss_close_to_each_expert_alone_and_better_than_linear_merge(three_tasks, tiny_base, composed):
    from peft import PeftModel

    from mergekit_moe.base import load_base

    moe, tok, _ = load_composed(three_tasks / "moe", tiny_base)
    lin, _, _ = load_composed(three_tasks / "linear", tiny_base)
    for t in TASKS:
        rows = [json.loads(x) for x in (three_tasks / f"{t}-heldout.jsonl").read_text().splitlines()]
        base, _ = load_base(tiny_base)
        alone = PeftModel.from_pretrained(base, str(three_tasks / f"expert-{t}")).eval()
        l_alone, l_moe, l_lin = answer_loss(alone, tok, rows), answer_loss(moe, tok, rows), answer_loss(lin, tok, rows)
        assert l_moe < l_lin, (t, l_moe, l_lin)
        assert l_moe < l_alone + 0.5 * (l_lin - l_alone) + 0.05, (t, l_alone, l_moe, l_lin)


def test_knowledge_path_keeps_general_outputs_close_to_the_base(three_tasks, tiny_base, composed):
    rows = [json.loads(x) for x in (three_tasks / "general-heldout.jsonl").read_text().splitlines()]
    cal, tok, _ = load_composed(three_tasks / "moe", tiny_base)
    uni, _, _ = load_composed(three_tasks / "uniform", tiny_base)
    assert kl_to_base(cal, tok, rows) < kl_to_base(uni, tok, rows)
    assert composed.calibration["kl_general_after"] < composed.calibration["kl_general_before"]


def test_calibration_report_and_determinism(three_tasks, tiny_base, composed):
    from mergekit_moe.checkpoint import load_checkpoint

    rep_dir = three_tasks / "moe" / "calibration"
    report = json.loads((rep_dir / "calibration.json").read_text())
    assert (rep_dir / "loss_curves.png").stat().st_size > 1000 and (rep_dir / "routing_heatmap.png").stat().st_size > 1000
    losses = report["losses"]
    assert len(losses["total"]) == 80 and set(losses) == {"total", "lm", "routing", "balance", "kl"}
    assert sum(losses["routing"][-10:]) < sum(losses["routing"][:10])  # the routers learned
    assert set(report["mean_weight"]) == set(TASKS) | {"(general)"}
    # general rows are routed to the knowledge (null) slot: chance is 1/4
    assert report["summary"]["general_to_knowledge_after"] > 0.6
    # same recipe, same seed: identical routers
    f = three_tasks / "recipe-again.yaml"
    f.write_text(recipe_text(three_tasks, tiny_base, "./moe-again"))
    compose(f)
    a, b = load_checkpoint(three_tasks / "moe"), load_checkpoint(three_tasks / "moe-again")
    for L in a.layers:
        assert torch.equal(a.layers[L].router_weight, b.layers[L].router_weight)


def test_sequence_routing_calibrates_too(three_tasks, tiny_base):
    """One mixture per prompt (mean prompt state): the routers still learn to pick the task's expert."""
    f = three_tasks / "recipe-seq.yaml"
    f.write_text(recipe_text(three_tasks, tiny_base, "./moe-seq").replace("routing: {init: hidden}",
                                                                        "routing: {init: arrow, granularity: sequence}")
                 .replace("steps: 80", "steps: 40"))
    from mergekit_moe.progress import NullReporter

    class Progress(NullReporter):  # records what a progress bar would show
        def __init__(self):
            super().__init__()
            self.totals, self.done = {}, {}

        def start(self, task, total=None):
            self.totals[task], self.done[task] = total, 0

        def advance(self, task, n=1, **metrics):
            self.done[task] += n

    rep = Progress()
    res = compose(f, reporter=rep)
    acc = res.calibration["routing_accuracy_per_task"]
    assert sum(acc.values()) / len(acc) > 0.6, acc  # chance: 1/4
    # every long stage of calibration shows progress that reaches its total (the held-out passes too)
    for task in ("calibrate", "held-out routing, before", "held-out routing, after", "KL to base, before", "KL to base, after"):
        assert rep.totals[task] and rep.done[task] == rep.totals[task], (task, rep.totals, rep.done)
    from mergekit_moe.checkpoint import load_checkpoint

    assert load_checkpoint(three_tasks / "moe-seq").routing.granularity == "sequence"
