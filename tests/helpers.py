"""Shared test helpers: tiny models and real PEFT adapters built in-process (no downloads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def make_peft_adapter(base_dir, out_dir, *, r: int = 4, alpha: int = 8, targets=None, seed: int = 0,
                      scale: float = 0.5, use_rslora: bool = False) -> Path:
    """Save a real PEFT LoRA adapter for ``base_dir`` with random, non-zero A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or ["q_proj", "v_proj"],
                     lora_dropout=0.0, use_rslora=use_rslora, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(out_dir)
    return Path(out_dir)


def run_cli(*args, env=None, cwd=None, check=False, timeout=600) -> subprocess.CompletedProcess:
    """Run ``moemerge`` as a user would: a subprocess with its own environment."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "mergekit_moe", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"moemerge {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc
