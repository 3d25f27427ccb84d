"""moemerge train on tiny real models: learning, PEFT-loadable bundles, registry metadata, recipes, errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from helpers import run_cli
from mergekit_moe.errors import TrainError
from mergekit_moe.progress import NullReporter
from mergekit_moe.train import TrainConfig, train_expert, train_recipe

COLORS = {"apple": "red", "banana": "yellow", "grape": "purple", "lime": "green"}


@pytest.fixture(scope="module")
def learnable_base(tmp_path_factory):
    """The tiny Llama with a 10x larger LM head: a random 0.02-std head caps logits near uniform, so
    no LoRA on the blocks could fit anything; scaled up, the frozen head lets LoRA learn a toy task."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_moe.tiny import build_tiny_model

    src = build_tiny_model(tmp_path_factory.mktemp("tiny-src"), arch="llama", seed=0)
    out = tmp_path_factory.mktemp("learnable-llama")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def color_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        fruit = rng.choice(sorted(COLORS))
        rows.append({"id": f"c{seed}-{i}", "task": "colors", "prompt": f"Color of {fruit}?", "response": COLORS[fruit]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_loss_goes_down_and_bundle_loads_in_peft(learnable_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_moe.bundle import read_bundle
    from mergekit_moe.data import data_fingerprint, format_prompt
    from mergekit_moe.registry import Registry

    data = write_jsonl(tmp_path / "colors.jsonl", color_rows(120))
    cfg = TrainConfig(data=str(data), max_steps=40, lr=5e-3, batch_size=8, dropout=0.0, eval_every=20, save_every=0)
    reg = Registry()
    res = train_expert(learnable_base, cfg, name="colors", task="colors", registry=reg, reporter=NullReporter())
    m = res.metrics
    assert m["steps"] == 40 and m["tokens"] > 0 and m["wall_time_s"] > 0
    assert m["val_loss"] < 0.3 * m["initial_val_loss"], m
    assert res.registry_ref == "colors@1"

    bundle = reg.bundle("colors")
    bundle.verify()
    meta = read_bundle(bundle.path).meta
    assert meta.data_fingerprint == data_fingerprint([data, None]) == res.data_fingerprint
    assert meta.hyperparameters["lr"] == 5e-3 and meta.hyperparameters["rank"] == 8
    assert {"train_loss", "val_loss", "steps", "tokens", "wall_time_s"} <= set(meta.metrics)
    assert Path(res.loss_curve).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(bundle.files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]  # pushable types only

    tok = AutoTokenizer.from_pretrained(learnable_base)
    base = AutoModelForCausalLM.from_pretrained(learnable_base, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(bundle.path)).eval()
    for fruit, color in COLORS.items():
        ids = tok(format_prompt({"prompt": f"Color of {fruit}?"}, tok), add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        assert tok.decode(out[0, ids["input_ids"].shape[1]:]).startswith(color)


def test_cli_trains_registers_and_prints_table(tiny_base, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", color_rows(40))
    out = tmp_path / "bundle-out"
    proc = run_cli("train", "--base", tiny_base, "--data", data, "--name", "cli-expert", "--task", "colors",
                   "--max-steps", "3", "--batch-size", "4", "--rank", "4", "--alpha", "8", "--max-length", "64", "--seed", "1",
                   "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "cli-expert@1" in proc.stdout and "trained" in proc.stdout
    from mergekit_moe.registry import Registry

    meta = Registry().bundle("cli-expert").meta
    assert meta.task == "colors" and meta.hyperparameters["rank"] == 4 and meta.hyperparameters["seed"] == 1
    assert (out / "expert.json").is_file() and (tmp_path / "bundle-out-loss_curve.png").is_file()
    again = run_cli("train", "--base", tiny_base, "--data", data, "--name", "other", "--max-steps", "1", "--out", out)
    assert again.returncode == 1 and "already exists" in again.stderr
    same = run_cli("train", "--base", tiny_base, "--data", data, "--name", "cli-expert", "--task", "colors",
                   "--max-steps", "3", "--batch-size", "4", "--rank", "4", "--alpha", "8", "--max-length", "64", "--seed", "1")
    assert same.returncode == 0 and "skipped" in same.stdout and "cli-expert@1" in same.stdout, same.stdout + same.stderr
    assert len(Registry().find(name="cli-expert")) == 1


@pytest.mark.parametrize("ref, needle", [("org/not-in-cache", "not in the local Hugging Face cache"),
                                         ("./no/such/dir", "not found")])
def test_missing_base_is_one_line_error(tmp_path, ref, needle):
    data = write_jsonl(tmp_path / "d.jsonl", color_rows(10))
    proc = run_cli("train", "--base", ref, "--data", data, "--name", "x", cwd=tmp_path)
    assert proc.returncode == 1 and needle in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize("arch", ["gpt2", "phi3", "qwen2", "mistral"])
def test_default_targets_per_architecture(tiny_base_factory, tmp_path, arch):
    from mergekit_moe.arch import default_target_modules
    from mergekit_moe.lora import read_adapter

    base = tiny_base_factory(arch)
    data = write_jsonl(tmp_path / "d.jsonl", color_rows(12))
    res = train_expert(base, TrainConfig(data=str(data), max_steps=1, batch_size=4, eval_every=0, save_every=0),
                       name=f"t-{arch}", out_dir=tmp_path / "b", run_dir=tmp_path / "run")
    adapter = read_adapter(res.bundle_dir)
    suffixes = {m.rsplit(".", 1)[-1] for m in adapter.factors}
    assert suffixes == set(default_target_modules(arch)), suffixes
    n_layers = 4
    assert len(adapter.factors) >= n_layers * len(suffixes)


def test_truncation_is_reported(tiny_base, tmp_path):
    rows = color_rows(10) + [{"prompt": "long " * 200, "response": "x"}, {"prompt": "Color?", "response": "y " * 200}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    rep = NullReporter()
    train_expert(tiny_base, TrainConfig(data=str(data), max_steps=1, batch_size=4, max_length=48, val_fraction=0.0,
                                        eval_every=0, save_every=0),
                 name="trunc", run_dir=tmp_path / "run", reporter=rep)
    assert any("2 of 12 rows are longer than max_length=48" in w and "1 lost their whole answer" in w for w in rep.warnings), rep.warnings


def test_bad_target_modules_and_settings(tiny_base, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", color_rows(10))
    with pytest.raises(TrainError, match="target modules"):
        train_expert(tiny_base, TrainConfig(data=str(data), max_steps=1, target_modules=["nope_proj"]), name="x",
                     run_dir=tmp_path / "r")
    with pytest.raises(TrainError, match="unknown train setting"):
        TrainConfig.from_dict({"data": "x", "learning_rate": 1})


RECIPE = """\
base_model: {base}
experts:
  - name: alpha
    train: {{data: a.jsonl, max_steps: 2, batch_size: 4, lr: {lr_a}, eval_every: 0, save_every: 0}}
  - name: beta
    train: {{data: b.jsonl, max_steps: 2, batch_size: 4, eval_every: 0, save_every: 0}}
  - name: gamma
    source: ./somewhere
output: {{path: ./out}}
"""


def test_recipe_training_skips_up_to_date_and_retrains_changed(tiny_base, tmp_path):
    from mergekit_moe.recipe import load_recipe
    from mergekit_moe.registry import Registry

    write_jsonl(tmp_path / "a.jsonl", color_rows(12, seed=1))
    write_jsonl(tmp_path / "b.jsonl", color_rows(12, seed=2))
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(RECIPE.format(base=tiny_base, lr_a=1e-3), encoding="utf-8")
    reg = Registry()
    first = train_recipe(load_recipe(recipe_path), registry=reg)
    assert [(r.name, r.skipped) for r in first] == [("alpha", False), ("beta", False)]

    rep = NullReporter()
    second = train_recipe(load_recipe(recipe_path), registry=reg, reporter=rep)
    assert [r.skipped for r in second] == [True, True]
    assert sum("up to date" in i for i in rep.infos) == 2

    write_jsonl(tmp_path / "b.jsonl", color_rows(12, seed=3))               # beta's data changed
    recipe_path.write_text(RECIPE.format(base=tiny_base, lr_a=2e-3), encoding="utf-8")  # alpha's lr changed
    third = train_recipe(load_recipe(recipe_path), registry=reg)
    assert [(r.name, r.skipped, r.registry_ref) for r in third] == [("alpha", False, "alpha@2"), ("beta", False, "beta@2")]

    proc = run_cli("train", recipe_path)  # the CLI path: everything is up to date now
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("skipped") == 2


def test_base_from_the_local_hf_cache_by_hub_id(tiny_base, tmp_path, monkeypatch):
    """A Hub id already in the HF cache trains offline (no network is touched: HF_HUB_OFFLINE=1)."""
    import shutil

    hub = tmp_path / "hf-cache-home" / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = hub / "models--acme--tiny-llama" / "snapshots" / commit
    shutil.copytree(tiny_base, snap)
    (hub / "models--acme--tiny-llama" / "refs").mkdir(parents=True)
    (hub / "models--acme--tiny-llama" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-cache-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write_jsonl(tmp_path / "d.jsonl", color_rows(10))
    proc = run_cli("train", "--base", "acme/tiny-llama", "--data", data, "--name", "cached", "--max-steps", "1",
                   "--eval-every", "0", "--save-every", "0")
    assert proc.returncode == 0, proc.stderr
    from mergekit_moe.registry import Registry

    meta = Registry().bundle("cached").meta
    from mergekit_moe.base import fingerprint_of

    assert meta.base_model == "acme/tiny-llama" and meta.base_fingerprint == fingerprint_of(tiny_base)
