"""Training throughput: `moemerge train` vs a plain PEFT + transformers.Trainer loop, side by side.

    python benchmarks/train_throughput.py [--base DIR|.gguf|hub-id] [--data recipes/data/diagnosis]
                                          [--steps 30] [--batch-size 8] [--max-length 256] [--repeats 2]

Both sides train the same LoRA (same base, targets, rank, alpha, dropout) on the same tokenized
examples (response-only labels, padded to the longest example of each batch), with the same
optimizer settings (AdamW, warmup + cosine, clipping), batch size and number of steps, without
evaluation or checkpoints. Throughput is non-padding tokens per second of the training loop
(model loading excluded on both sides). Runs alternate (ours, Trainer, ours, ...) and the median
of ``--repeats`` is reported (after one short warm-up run of each), printed as the ratio ours / Trainer. Without ``--base`` a small
random Llama (hidden 256, 4 layers) is built in-process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_ours(base: str, cfg, workdir: Path) -> tuple[float, int]:
    from mergekit_moe.train import train_expert

    res = train_expert(base, cfg, name="bench", run_dir=workdir / f"run-{time.time_ns()}", out_dir=workdir / f"out-{time.time_ns()}")
    return res.metrics["tokens_per_s"], res.metrics["tokens"]


def run_trainer(base: str, cfg, workdir: Path) -> tuple[float, int]:
    """The baseline a practitioner would write: get_peft_model + Trainer on the same examples."""
    import torch
    from transformers import Trainer, TrainingArguments

    from mergekit_moe import base as basemod
    from mergekit_moe.data import collate, load_rows, tokenize_rows
    from mergekit_moe.train import make_lora_model, resolve_data
    from mergekit_moe.train_loop import pick_dtype

    train_file, _ = resolve_data(cfg)
    tok = basemod.load_tokenizer(base)
    examples = tokenize_rows(load_rows(train_file), tok, cfg.max_length).examples
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = pick_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    model, _ = basemod.load_base(base, dtype=dtype, with_tokenizer=False)
    config = basemod.load_config(base)
    peft_model = make_lora_model(model, cfg, config.model_type)
    counted = {"tokens": 0}

    def count_tokens(_module, _args, kwargs):
        # counted at forward time: accelerate's dataloader collates one batch ahead, so the collator over-counts
        if torch.is_grad_enabled() and kwargs.get("attention_mask") is not None:
            counted["tokens"] += int(kwargs["attention_mask"].sum())

    peft_model.register_forward_pre_hook(count_tokens, with_kwargs=True)

    def collator(batch):
        return collate(batch, tok.pad_token_id)

    args = TrainingArguments(
        output_dir=str(workdir / f"trainer-{time.time_ns()}"), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, max_steps=cfg.max_steps, learning_rate=cfg.lr,
        lr_scheduler_type="cosine", warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, logging_steps=10**6, save_strategy="no", eval_strategy="no", report_to=[],
        seed=cfg.seed, dataloader_num_workers=0, remove_unused_columns=False, use_cpu=device == "cpu",
        bf16=dtype == torch.bfloat16, disable_tqdm=True,
    )
    trainer = Trainer(model=peft_model, args=args, train_dataset=examples, data_collator=collator)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    return counted["tokens"] / wall, counted["tokens"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base")
    ap.add_argument("--data", default=str(REPO / "recipes" / "data" / "diagnosis"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from mergekit_moe.cli._console import quiet_libraries
    from mergekit_moe.train import TrainConfig

    quiet_libraries()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        work = Path(tmp)
        base = args.base
        if base is None:
            from mergekit_moe.tiny import build_tiny_model

            base = str(build_tiny_model(work / "base", arch="llama", hidden=256, layers=4, heads=8, kv_heads=4))
        from mergekit_moe.data import resolve_file

        # the training file itself: a data directory would bring its validation split (and evaluations) along
        train_file = str(resolve_file(args.data, "train"))
        cfg = TrainConfig(data=train_file, max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                          rank=args.rank, alpha=2 * args.rank, dropout=0.05, val_fraction=0.0, eval_every=0, save_every=0)
        results: dict[str, list[float]] = {"moemerge train": [], "PEFT + transformers.Trainer": []}
        sides = [("moemerge train", run_ours), ("PEFT + transformers.Trainer", run_trainer)]
        warm = TrainConfig(**{**cfg.to_dict(), "max_steps": 2})
        for _label, fn in sides:  # warm-up (lazy kernel init, page cache), not measured
            fn(base, warm, work)
        for i in range(args.repeats):
            for label, fn in (sides if i % 2 == 0 else sides[::-1]):  # alternate the order against drift
                tps, n_tok = fn(base, cfg, work)
                results[label].append(tps)
                console.print(f"run {i + 1}/{args.repeats} {label}: {tps:,.0f} tokens/s ({n_tok} tokens)", highlight=False)
    ours = statistics.median(results["moemerge train"])
    theirs = statistics.median(results["PEFT + transformers.Trainer"])
    t = Table(title=f"training throughput ({args.steps} steps, batch {args.batch_size}, max_length {args.max_length}, rank {args.rank})",
              title_justify="left")
    for c in ("loop", "tokens/s (median)", "ratio"):
        t.add_column(c)
    t.add_row("moemerge train", f"{ours:,.0f}", f"{ours / theirs:.2f}x")
    t.add_row("PEFT + transformers.Trainer", f"{theirs:,.0f}", "1.00x")
    console.print(t)
    console.print(f"ratio moemerge/Trainer: {ours / theirs:.2f}x (target >= 1.0x)", highlight=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
