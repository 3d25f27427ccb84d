"""The LoRA training loop: AdamW, warmup + cosine, gradient accumulation, clipping, DDP, checkpoints.

A plain PyTorch loop (no ``transformers.Trainer``): per optimizer step it pads each micro-batch to
its longest example, runs the decoder once, and applies the LM head only at answer positions
(most tokens are prompt tokens, and the head is the widest matmul of a small model).

Determinism: the data order of epoch ``e`` is ``randperm(n, seed + e)``, and the data position is
the number of examples consumed, so a resumed run sees exactly the batches an uninterrupted run
sees. Under DDP each optimizer step uses the same *global* batch (``batch_size`` examples per
micro-step, dealt round-robin to ranks) and the loss is normalised by the global number of answer
tokens, so N processes compute the same update as one.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from .arch import ARCHS
from .data import IGNORE_INDEX, collate
from .progress import Reporter
from .train_ckpt import (Checkpoint, fault_point, load_adapter_into, load_trainer_state, rng_state, save_checkpoint,
                         set_rng_state)


# ---------------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Join the process group that ``torchrun`` / ``accelerate launch`` describe in the environment."""
    import torch
    import torch.distributed as tdist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    else:
        device = "cpu"
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, world, local, device)


def barrier(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as tdist

        tdist.barrier()


def _all_reduce(dist: Dist, t):
    if dist.enabled:
        import torch.distributed as tdist

        tdist.all_reduce(t)
    return t


def pick_dtype(name: str, device: str):
    """``auto``: bf16 on GPUs that support it, fp32 otherwise (CPU bf16 is slower and less exact)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
            "float16": torch.float16, "fp16": torch.float16}[name]


# ------------------------------------------------------------------------------------------ loss
def _loss_module(peft_model):
    import torch
    import torch.nn.functional as F

    class AnswerLoss(torch.nn.Module):
        """``forward(input_ids (B,T), attention_mask (B,T), labels (B,T), norm) -> (sum CE / norm, sum CE)``."""

        def __init__(self, model):
            super().__init__()
            self.model = model
            hf = model.get_base_model()
            # fast path for known families: decoder once, LM head only on answer positions
            self.fast = hf.config.model_type in ARCHS and hf.get_output_embeddings() is not None

        def forward(self, input_ids, attention_mask, labels, norm: float):
            target = labels[:, 1:]
            sel = target != IGNORE_INDEX
            if self.fast:
                hf = self.model.get_base_model()
                decoder = getattr(hf, hf.base_model_prefix)
                hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
                logits = hf.get_output_embeddings()(hidden[:, :-1][sel]).float()   # (N_answer, V)
            else:
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][sel].float()
            loss_sum = F.cross_entropy(logits, target[sel], reduction="sum")
            return loss_sum / norm, loss_sum.detach()

    return AnswerLoss(peft_model)


# ------------------------------------------------------------------------------------------ loop
@dataclass
class LoopResult:
    step: int
    total_steps: int
    tokens: int
    target_tokens: int
    wall_time_s: float
    history: dict[str, list[list[float]]] = field(default_factory=dict)
    resumed_from: int | None = None
    eval_time_s: float = 0.0          # part of wall_time_s spent on validation

    @property
    def tokens_per_s(self) -> float:
        """Training tokens (non-padding) per second of training, validation time excluded."""
        return self.tokens / max(1e-9, self.wall_time_s - self.eval_time_s)

    @property
    def train_loss(self) -> float | None:
        tail = [v for _s, v in self.history.get("train", [])[-10:]]
        return sum(tail) / len(tail) if tail else None

    @property
    def val_loss(self) -> float | None:
        v = self.history.get("val", [])
        return v[-1][1] if v else None


class _Order:
    """Epoch-wise deterministic shuffles; ``take(start, n)`` returns example indices start..start+n of the stream."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._cache = n, seed, {}

    def _perm(self, epoch: int) -> list[int]:
        import torch

        if epoch not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._cache[epoch]

    def take(self, start: int, count: int) -> list[int]:
        out: list[int] = []
        while count:
            epoch, off = divmod(start, self.n)
            chunk = self._perm(epoch)[off:off + count]
            out += chunk
            start += len(chunk)
            count -= len(chunk)
        return out


def total_steps_for(cfg, n_train: int) -> int:
    if cfg.max_steps:
        return int(cfg.max_steps)
    per_step = cfg.batch_size * cfg.grad_accum
    return max(1, math.ceil(cfg.epochs * n_train / per_step))


def run_loop(*, peft_model, cfg, train_examples: list[dict], val_examples: list[dict], pad_id: int, run_dir,
             signature: dict[str, Any], dist: Dist, reporter: Reporter, label: str,
             resume_from: Checkpoint | None = None) -> LoopResult:
    """Train ``peft_model`` in place; checkpoints go to ``run_dir/checkpoints`` (rank 0 writes)."""
    import torch

    device = dist.device
    if cfg.batch_size < dist.world:
        from .errors import TrainError

        raise TrainError(f"batch_size {cfg.batch_size} is smaller than the {dist.world} processes",
                         hint="the batch is the global batch; raise --batch-size to at least the world size")
    loss_mod = _loss_module(peft_model)
    runner = loss_mod
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        runner = DDP(loss_mod, device_ids=[dist.local_rank] if device.startswith("cuda") else None)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    try:  # the fused kernel (CPU and CUDA) updates all LoRA tensors in one pass; same math as the loop version
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = total_steps_for(cfg, len(train_examples))
    warmup = math.ceil(cfg.warmup_ratio * total)

    def lr_factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        progress = (s - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    step, consumed, tokens, target_tokens, wall_before, eval_before = 0, 0, 0, 0, 0.0, 0.0
    history: dict[str, list[list[float]]] = {"train": [], "val": []}
    if resume_from is not None:
        load_adapter_into(peft_model, resume_from)
        ts = load_trainer_state(resume_from, map_location=device)
        opt.load_state_dict(ts["optimizer"])
        sched.load_state_dict(ts["scheduler"])
        rngs = ts["rng"]
        if len(rngs) == dist.world:
            set_rng_state(rngs[dist.rank])
        else:
            reporter.warn(f"checkpoint was written by {len(rngs)} process(es), now {dist.world}: dropout RNG reseeded")
            torch.manual_seed(cfg.seed + 7919 * dist.rank + resume_from.step)
        st = resume_from.state
        step, consumed = int(st["step"]), int(st["consumed"])
        tokens, target_tokens, wall_before = int(st["tokens"]), int(st["target_tokens"]), float(st["wall_time_s"])
        eval_before = float(st.get("eval_time_s", 0.0))
        history = {k: [list(x) for x in v] for k, v in st["history"].items()}

    order = _Order(len(train_examples), cfg.seed)
    val_sorted = sorted(val_examples, key=lambda e: len(e["input_ids"]))[dist.rank::dist.world]

    @torch.no_grad()
    def evaluate() -> float | None:
        if not val_examples:
            return None
        peft_model.eval()
        acc = torch.zeros(2, dtype=torch.float64, device=device)
        for i in range(0, len(val_sorted), cfg.batch_size):
            b = {k: v.to(device) for k, v in collate(val_sorted[i:i + cfg.batch_size], pad_id).items()}
            _, s = loss_mod(b["input_ids"], b["attention_mask"], b["labels"], 1.0)
            acc[0] += s.double()
            acc[1] += (b["labels"][:, 1:] != IGNORE_INDEX).sum()
        _all_reduce(dist, acc)
        peft_model.train()
        return float(acc[0] / acc[1].clamp(min=1))

    if step == 0 and val_examples:  # the starting point of the validation curve
        v0 = evaluate()
        if v0 is not None:
            history["val"].append([0, v0])
    reporter.start(label, total=total)
    if step:
        reporter.advance(label, step)
    peft_model.train()
    t0 = time.perf_counter()
    seg_tokens, eval_s = 0, 0.0
    while step < total:
        micro, n_target, n_tok = [], 0, 0
        for _ in range(cfg.grad_accum):
            idx = order.take(consumed, cfg.batch_size)
            consumed += cfg.batch_size
            b = collate([train_examples[i] for i in idx[dist.rank::dist.world]], pad_id)
            # counted from the lists on the host: no device round trip per micro-batch
            n_target += int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
            n_tok += int(b["attention_mask"].sum())
            micro.append({k: v.to(device, non_blocking=True) for k, v in b.items()})
        counts = torch.tensor([n_target, n_tok], dtype=torch.float64, device=device)
        _all_reduce(dist, counts)
        # DDP averages gradients over ranks; scaling by world makes the sum the global token mean
        norm = float(counts[0]) / dist.world
        loss_acc = torch.zeros(1, dtype=torch.float64, device=device)
        for j, m in enumerate(micro):
            sync = contextlib.nullcontext() if (not dist.enabled or j == len(micro) - 1) else runner.no_sync()
            with sync:
                loss, s = runner(m["input_ids"], m["attention_mask"], m["labels"], norm)
                loss.backward()
            loss_acc += s.double()
        if cfg.max_grad_norm and cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        _all_reduce(dist, loss_acc)
        loss_val = float(loss_acc[0]) / max(1.0, float(counts[0]))
        tokens += int(counts[1])
        seg_tokens += int(counts[1])
        target_tokens += int(counts[0])
        history["train"].append([step, loss_val])
        metrics: dict[str, Any] = {"loss": loss_val}
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == total:
            te = time.perf_counter()
            v = evaluate()
            eval_s += time.perf_counter() - te
            if v is not None:
                history["val"].append([step, v])
        if history["val"]:
            metrics["val"] = history["val"][-1][1]
        metrics["tok/s"] = f"{seg_tokens / max(1e-9, time.perf_counter() - t0 - eval_s):.0f}"
        reporter.advance(label, 1, **metrics)
        if cfg.save_every and step % cfg.save_every == 0 and step < total:
            rngs = _gather_rng(dist)
            if dist.main:
                state = {"consumed": consumed, "tokens": tokens, "target_tokens": target_tokens,
                         "wall_time_s": wall_before + time.perf_counter() - t0, "eval_time_s": eval_before + eval_s,
                         "history": history, "signature": signature}
                save_checkpoint(run_dir, step, peft_model=peft_model, keep=cfg.keep_checkpoints, state=state,
                                trainer_state={"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rngs})
            barrier(dist)
        fault_point("step", step)
    reporter.finish(label)
    return LoopResult(step, total, tokens, target_tokens, wall_before + time.perf_counter() - t0, history,
                      resume_from.step if resume_from is not None else None, eval_before + eval_s)


def _gather_rng(dist: Dist) -> list[dict[str, Any]]:
    """Every rank's RNG states (rank order), so each rank resumes its own dropout stream."""
    mine = rng_state()
    if not dist.enabled:
        return [mine]
    import torch.distributed as tdist

    out: list[Any] = [None] * dist.world
    tdist.all_gather_object(out, mine)
    return out


def teardown_distributed() -> None:
    """Leave the process group (if this process joined one)."""
    try:
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()
    except Exception:  # best effort at exit
        pass
