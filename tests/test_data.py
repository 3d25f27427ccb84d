"""Task data: row formats, clear errors with row numbers, tokenization with response-only labels, demo data splits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mergekit_moe.data import (IGNORE_INDEX, collate, data_fingerprint, format_prompt, load_rows, split_rows,
                               tokenize_example, tokenize_rows)
from mergekit_moe.errors import DataError
from helpers import REPO, run_cli

DEMO = REPO / "recipes" / "data"
TASKS = ("diagnosis", "report_summary", "ddi", "general")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok():
    from mergekit_moe.tiny import build_tokenizer

    return build_tokenizer()


def test_all_row_shapes_and_formats_normalize(tmp_path):
    rows = [{"prompt": "Symptoms: fever", "response": "influenza", "task": "dx", "id": "a1"},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}]},
            {"text": "Water boils at 100 degrees Celsius."}]
    out = load_rows(write_jsonl(tmp_path / "mixed.jsonl", rows), task="fallback")
    assert out[0] == {"id": "a1", "task": "dx", "prompt": "Symptoms: fever", "response": "influenza"}
    assert out[1]["response"] == "Hello" and out[1]["messages"][0]["role"] == "system" and out[1]["task"] == "fallback"
    assert out[2]["text"].startswith("Water") and out[2]["id"] == "mixed-2"

    import pandas as pd

    pr = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(3)]
    pd.DataFrame(pr).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(pr).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(pr), encoding="utf-8")
    for name in ("d.csv", "d.parquet", "d.json"):
        got = load_rows(tmp_path / name)
        assert [(r["prompt"], r["response"]) for r in got] == [(f"p{i}", f"r{i}") for i in range(3)], name
    # a directory with split files
    (tmp_path / "ds").mkdir()
    write_jsonl(tmp_path / "ds" / "train.jsonl", pr)
    write_jsonl(tmp_path / "ds" / "test.jsonl", pr[:1])
    assert len(load_rows(tmp_path / "ds")) == 3 and len(load_rows(tmp_path / "ds", split="test")) == 1
    with pytest.raises(DataError, match="no validation"):
        load_rows(tmp_path / "ds", split="validation")


@pytest.mark.parametrize("rows, bad_row, needle", [
    ([{"prompt": "a", "response": "b"}, {"prompt": "a", "response": "b"}, {"prompt": "c"}], 3, "missing field 'response'"),
    ([{"prompt": "a", "response": "b"}, {"response": "b"}], 2, "missing field 'prompt'"),
    ([{"question": "a", "answer": "b"}], 1, "has: answer, question"),
    ([{"prompt": "a", "response": "b"}, {"messages": [{"role": "user", "content": "x"}]}], 2, "last message must be the assistant"),
    ([{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}], 1, "messages[0]"),
    (['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": }'], 2, "invalid JSON"),
    ([{"prompt": "a", "response": "b"}, {"text": ""}], 2, "'text' must be a non-empty string"),
])
def test_bad_rows_name_file_and_row(tmp_path, rows, bad_row, needle):
    f = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as ei:
        load_rows(f)
    msg = str(ei.value)
    assert "\n" not in msg and str(f) in msg and f"row {bad_row}" in msg and needle in msg, msg


def test_bad_csv_row_and_unknown_format(tmp_path):
    (tmp_path / "d.csv").write_text("prompt,response\na,b\nc,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"row 2: missing field 'response'"):
        load_rows(tmp_path / "d.csv")
    (tmp_path / "d.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="unknown data format"):
        load_rows(tmp_path / "d.txt")
    with pytest.raises(DataError, match="not found"):
        load_rows(tmp_path / "missing.jsonl")


def test_cli_reports_bad_row_in_one_line(tmp_path, tiny_base):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}] * 4 + [{"prompt": "only a prompt"}])
    proc = run_cli("train", "--base", tiny_base, "--data", f, "--name", "x", "--max-steps", "1")
    assert proc.returncode == 1
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "row 5" in lines[0] and "bad.jsonl" in lines[0] and "Traceback" not in proc.stderr, proc.stderr


def test_labels_cover_exactly_the_answer(tok):
    row = {"id": "1", "task": "t", "prompt": "Symptoms: fever and cough.", "response": "influenza"}
    ex, cut = tokenize_example(row, tok, 512)
    assert not cut and len(ex["input_ids"]) == len(ex["labels"])
    n_prompt = sum(1 for x in ex["labels"] if x == IGNORE_INDEX)
    prompt_ids = tok(format_prompt(row, tok), add_special_tokens=False)["input_ids"]
    assert ex["input_ids"][:n_prompt] == prompt_ids  # the prompt is tokenized exactly as at generation time
    answer = tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX])
    assert answer.startswith("influenza") and tok.eos_token in answer
    assert all(lab == i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX)
    # plain text rows: every token is a target
    ex_t, _ = tokenize_example({"id": "2", "task": None, "text": "plain words"}, tok, 512)
    assert IGNORE_INDEX not in ex_t["labels"]


def test_truncation_is_counted_and_answerless_rows_dropped(tok):
    rows = [{"id": str(i), "task": "t", "prompt": "word " * (5 + 40 * (i % 2)), "response": "answer"} for i in range(6)]
    ts = tokenize_rows(rows, tok, 40)
    assert ts.n_rows == 6 and ts.n_truncated == 3 and ts.n_dropped == 3 and len(ts.examples) == 3
    assert all(len(e["input_ids"]) <= 40 for e in ts.examples)


def test_collate_pads_to_longest_in_batch(tok):
    exs = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = collate(exs, pad_id=0)
    assert b["input_ids"].shape == (2, 3)
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_split_is_deterministic_and_order_independent():
    rows = [{"id": f"r{i}"} for i in range(50)]
    tr, va = split_rows(rows, 0.2)
    tr2, va2 = split_rows(list(reversed(rows)), 0.2)
    assert len(va) == 10 and len(tr) == 40
    assert {r["id"] for r in va} == {r["id"] for r in va2}
    assert not {r["id"] for r in tr} & {r["id"] for r in va}


def test_fingerprint_follows_content_not_name(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "r"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "response": "r"}])
    c = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "response": "R"}])
    assert data_fingerprint([a, None]) == data_fingerprint([b, None]) != data_fingerprint([c, None])


# ------------------------------------------------------------------------------------ demo data
def _raw(task: str, split: str) -> list[dict]:
    return [json.loads(ln) for ln in (DEMO / task / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("task", TASKS)
def test_demo_splits_are_item_disjoint_and_loadable(task):
    train = _raw(task, "train")
    for split in ("validation", "test"):
        other = _raw(task, split)
        assert other, f"{task}/{split} is empty"
        assert not {r["item"] for r in train} & {r["item"] for r in other}, f"{task}: {split} shares items with train"
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in other}
    assert 200 <= len(train) <= 5000
    rows = load_rows(DEMO / task, split="test")
    assert all(r["task"] == task and r["id"].startswith(f"{task}-test-") for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)


def test_demo_answers_are_short_and_checkable():
    dx_train, dx_test = _raw("diagnosis", "train"), _raw("diagnosis", "test")
    labels = {r["response"] for r in dx_train}
    assert len(labels) == 20 and {r["response"] for r in dx_test} <= labels
    ddi = _raw("ddi", "train") + _raw("ddi", "test")
    assert {r["response"].split(":")[0] for r in ddi} == {"major", "moderate", "minor", "none"}
    # every test interaction rule (class + mechanism) is taught in training through other drug pairs
    assert {r["response"] for r in _raw("ddi", "test")} <= {r["response"] for r in _raw("ddi", "train")}
    for r in _raw("report_summary", "test"):
        assert "\n" not in r["response"] and len(r["response"]) < 120 and "FINDINGS:" in r["prompt"]


def test_generator_reproduces_committed_files(tmp_path):
    subprocess.run([sys.executable, str(DEMO / "make_demo_data.py"), "--out", str(tmp_path)], check=True, capture_output=True)
    for task in TASKS:
        for split in ("train", "validation", "test"):
            assert (tmp_path / task / f"{split}.jsonl").read_bytes() == (DEMO / task / f"{split}.jsonl").read_bytes(), (task, split)
