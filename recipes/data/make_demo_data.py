"""Generate the demo task data (synthetic, built from small fact tables written for this project).

    python recipes/data/make_demo_data.py [--out recipes/data] [--seed 0]

Writes ``<out>/<task>/{train,validation,test}.jsonl`` for four tasks:

* ``diagnosis``      symptoms -> one condition name from a fixed label set of 20
* ``report_summary`` a structured radiology report -> a one-line impression
* ``ddi``            a drug pair -> interaction class (major/moderate/minor/none) and a short mechanism
* ``general``        general instructions and knowledge (facts, arithmetic, definitions) for the
                     knowledge-preservation expert

Splits are made per *item* (a symptom combination, a report's key finding and slots, an
unordered drug pair, a general question), so no test item appears in training. Rows carry
``id``, ``task``, ``prompt``, ``response`` and ``item`` (the item key, used to check the splits).
The output is deterministic for a given seed. Not medical advice: the tables are simplified.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_facts import (ANTONYMS, CAPITALS, CONDITIONS, DDI_RULES, DEFINITIONS, DRUGS, ELEMENTS,  # noqa: E402
                        REPORT_FINDINGS)

SPLITS = ("train", "validation", "test")


def split_items(items: list, rng: random.Random, val: float = 0.1, test: float = 0.2, min_train: int = 1) -> dict[str, list]:
    """Shuffle items and cut them into train/validation/test (at least ``min_train`` in train)."""
    items = list(items)
    rng.shuffle(items)
    n = len(items)
    n_test = int(round(n * test)) if n - min_train >= 2 else 0
    n_val = int(round(n * val)) if n - min_train - n_test >= 1 else 0
    return {"test": items[:n_test], "validation": items[n_test:n_test + n_val], "train": items[n_test + n_val:]}


# ------------------------------------------------------------------------------------- diagnosis
DX_TEMPLATES = [
    "A {age}-year-old {sex} presents with {s}. What is the most likely diagnosis? Answer with the condition name only.",
    "Symptoms: {s}. Give the most likely condition (name only).",
    "Patient ({sex}, {age}) reports {s}. Most likely diagnosis? Reply with the condition only.",
    "Clinical vignette: {s}. Which condition best explains these findings? Answer with the condition name.",
]


def _join(xs: list[str]) -> str:
    return ", ".join(xs[:-1]) + " and " + xs[-1] if len(xs) > 1 else xs[0]


def diagnosis(rng: random.Random) -> dict[str, list[dict]]:
    symptom_sets = {c: set(s) for c, s in CONDITIONS.items()}
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for cond, symptoms in CONDITIONS.items():
        combos = []
        for combo in itertools.combinations(symptoms, 3):
            # drop combinations that fit another condition too: every answer must be unambiguous
            if any(set(combo) <= other for c, other in symptom_sets.items() if c != cond):
                continue
            combos.append(combo)
        for split, items in split_items(combos, rng).items():
            for combo in items:
                for _ in range(2 if split == "train" else 1):  # two phrasings per training combination
                    s = list(combo)
                    rng.shuffle(s)
                    prompt = rng.choice(DX_TEMPLATES).format(age=rng.randint(18, 85), sex=rng.choice(["man", "woman"]), s=_join(s))
                    out[split].append({"prompt": prompt, "response": cond, "item": f"{cond}|{'+'.join(sorted(combo))}"})
    return out


# -------------------------------------------------------------------------------- report summary
INDICATIONS = ["follow-up", "trauma", "pain", "fever", "screening", "pre-operative assessment", "shortness of breath",
               "abnormal laboratory results"]


def _render_report(rng: random.Random, modality: str, spec: dict, finding: dict, slots: dict) -> dict:
    """One report row: every organ line normal except the key finding's organ."""
    lines = [f"{organ}: {finding['text'].format(**slots) if organ == finding['organ'] else normal}."
             for organ, normal in spec["organs"]]
    indication = slots.get("indication") or rng.choice(INDICATIONS)
    report = (f"EXAM: {modality}.\nINDICATION: {indication}, {rng.randint(18, 90)}-year-old "
              f"{rng.choice(['male', 'female'])}.\nFINDINGS:\n" + "\n".join(lines))
    impression = finding["impression"].format(**{k: v for k, v in slots.items() if k != "indication"})
    return {"prompt": f"Summarize this radiology report as a one-line impression.\n\n{report}",
            "response": impression[0].upper() + impression[1:],
            "item": f"{modality}|{finding['impression']}|{json.dumps(slots, sort_keys=True)}"}


def report_summary(rng: random.Random) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for modality, spec in REPORT_FINDINGS.items():
        items = []
        for finding in spec["findings"]:
            slot_names = list(finding["slots"])
            for values in itertools.product(*(finding["slots"][n] for n in slot_names)):
                items.append((finding, dict(zip(slot_names, values))))
        for ind in INDICATIONS:  # normal studies: the indication makes each item distinct
            items.append(({"organ": None, "text": None, "impression": spec["normal"], "slots": {}}, {"indication": ind}))
        for split, chosen in split_items(items, rng, val=0.1, test=0.2).items():
            for finding, slots in chosen:
                for _ in range(2 if split == "train" else 1):  # two renderings (indication, age, sex) per training item
                    out[split].append(_render_report(rng, modality, spec, finding, slots))
    return out


# ------------------------------------------------------------------------------------------- ddi
SEVERITY = {"major": 3, "moderate": 2, "minor": 1}
DDI_TEMPLATES = [
    "Drug pair: {a} + {b}. Classify the interaction (major, moderate, minor or none) and give the mechanism.",
    "Is there an interaction between {a} and {b}? Answer as '<class>: <mechanism>'.",
    "Check {a} with {b}: interaction class and mechanism?",
]


def classify_pair(a: str, b: str) -> tuple[str, str]:
    """(class, mechanism) of a drug pair from the class rules; the most severe matching rule wins."""
    ta, tb = set(DRUGS[a]), set(DRUGS[b])
    best = None
    for x, y, sev, mech in DDI_RULES:
        if (x in ta and y in tb) or (y in ta and x in tb):
            if best is None or SEVERITY[sev] > SEVERITY[best[0]]:
                best = (sev, mech)
    return best or ("none", "no clinically significant interaction expected")


def ddi(rng: random.Random) -> dict[str, list[dict]]:
    by_rule: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for a, b in itertools.combinations(sorted(DRUGS), 2):
        by_rule.setdefault(classify_pair(a, b), []).append((a, b))
    none_pairs = by_rule.pop(("none", "no clinically significant interaction expected"))
    n_interacting = sum(len(v) for v in by_rule.values())
    rng.shuffle(none_pairs)
    by_rule[("none", "no clinically significant interaction expected")] = none_pairs[:max(1, n_interacting // 2)]
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for (sev, mech), pairs in sorted(by_rule.items()):
        for split, chosen in split_items(pairs, rng, min_train=max(1, len(pairs) // 2)).items():
            for a, b in chosen:
                for _ in range(2 if split == "train" else 1):  # both orders in training
                    x, y = (a, b) if rng.random() < 0.5 else (b, a)
                    prompt = rng.choice(DDI_TEMPLATES).format(a=x, b=y)
                    out[split].append({"prompt": prompt, "response": f"{sev}: {mech}", "item": f"{a}|{b}"})
    return out


# --------------------------------------------------------------------------------------- general
def general(rng: random.Random) -> dict[str, list[dict]]:
    items: list[tuple[str, str, str]] = []  # (item key, prompt, response)
    for country, capital in CAPITALS.items():
        items.append((f"capital|{country}", f"What is the capital of {country}? Answer with the city name.", capital))
    for name, (symbol, number) in ELEMENTS.items():
        items.append((f"symbol|{name}", f"What is the chemical symbol of {name}?", symbol))
        items.append((f"atomic|{name}", f"What is the atomic number of {name}?", str(number)))
    for word, definition in DEFINITIONS.items():
        items.append((f"define|{word}", f"Define '{word}' in one sentence.", definition))
    for word, opposite in ANTONYMS.items():
        items.append((f"antonym|{word}", f"What is the opposite of '{word}'? One word.", opposite))
    seen = set()
    while len(seen) < 360:
        op = rng.choice(["+", "-", "*"])
        a, b = (rng.randint(2, 99), rng.randint(2, 99)) if op != "*" else (rng.randint(2, 15), rng.randint(2, 12))
        if (op, a, b) in seen:
            continue
        seen.add((op, a, b))
        val = {"+": a + b, "-": a - b, "*": a * b}[op]
        items.append((f"arith|{a}{op}{b}", rng.choice([f"What is {a} {op} {b}?", f"Compute {a} {op} {b}. Answer with the number only."]), str(val)))
    for m in rng.sample(range(1, 60), 40):
        items.append((f"convert|{m}m", f"How many centimeters are in {m} meters?", str(m * 100)))
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for split, chosen in split_items(items, rng, val=0.1, test=0.2).items():
        out[split] = [{"prompt": p, "response": r, "item": k} for k, p, r in chosen]
    return out


TASKS = {"diagnosis": diagnosis, "report_summary": report_summary, "ddi": ddi, "general": general}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for i, (task, make) in enumerate(TASKS.items()):
        rng = random.Random(args.seed * 100 + i)
        splits = make(rng)
        train_items = {r["item"] for r in splits["train"]}
        for split in ("validation", "test"):  # the guarantee the README makes
            leaked = train_items & {r["item"] for r in splits[split]}
            assert not leaked, f"{task}: {split} shares items with train: {sorted(leaked)[:3]}"
        d = Path(args.out) / task
        d.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            rows = splits[split]
            rng.shuffle(rows)
            with open(d / f"{split}.jsonl", "w", encoding="utf-8") as fh:
                for j, r in enumerate(rows):
                    fh.write(json.dumps({"id": f"{task}-{split}-{j:04d}", "task": task, **r}, ensure_ascii=False) + "\n")
        print(f"{task:15s} " + "  ".join(f"{s}={len(splits[s])}" for s in SPLITS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
