"""Model passes of ``moemerge eval``: batched greedy generation, teacher-forced losses with routing
recording, and the base-vs-target shift on general text. ``cfg`` is an ``evaluate.EvalConfig``
(``max_length``, ``loss_batch_size``).
"""

from __future__ import annotations

from typing import Any

from . import metrics as M
from .data import IGNORE_INDEX, collate, format_prompt, has_chat_template, tokenize_example
from .eval_target import Target, expert_weights
from .progress import Reporter, ensure


def _prompt_ids(row: dict, tok) -> list[int]:
    """Prompt token ids exactly as ``data.tokenize_example`` builds them for training."""
    ids = tok(format_prompt(row, tok), add_special_tokens=False)["input_ids"]
    bos = getattr(tok, "bos_token_id", None)
    if not has_chat_template(tok) and bos is not None and getattr(tok, "add_bos_token", False):
        ids = [bos] + ids
    return ids


def _stop_ids(model, tok) -> list[int]:
    """Token ids that end an answer: eos, the generation config's eos ids, ChatML's <|im_end|>."""
    ids: set[int] = set()
    for v in (tok.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    end = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else None
    if end is not None:
        ids.add(int(end))
    return sorted(ids)


def generate(model, tok, rows: list[dict], *, max_new_tokens: int, batch_size: int, max_length: int,
             reporter: Reporter | None = None, task: str = "generate") -> list[str]:
    """Greedy completions for ``rows`` (batched, left padding), in row order."""
    import torch
    from transformers import GenerationConfig

    rep = ensure(reporter)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gcfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                            eos_token_id=_stop_ids(model, tok), pad_token_id=pad)
    keep = max(1, max_length - max_new_tokens)
    prompts = [_prompt_ids(r, tok)[-keep:] for r in rows]  # keep the end: the question sits there
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))  # similar lengths batch together
    dev = next(model.parameters()).device
    out: list[str] = [""] * len(rows)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        T = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), T), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for j, i in enumerate(idx):
            ids[j, T - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[j, T - len(prompts[i]):] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), generation_config=gcfg).cpu()
        for j, i in enumerate(idx):
            out[i] = tok.decode(gen[j, T:], skip_special_tokens=True).strip()
        rep.advance(task, len(idx))
    return out


def _row_nll(logits, labels):
    """Per-row summed next-token NLL and token counts: logits (B, T, V), labels (B, T) -> (B,), (B,).

    Only the answer positions are gathered before the (V-wide) softmax: prompts are most of the tokens.
    """
    import torch

    lab = labels[:, 1:]
    keep = lab != IGNORE_INDEX
    nll_tok = torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), lab[keep], reduction="none")
    nll = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device)
    nll.index_add_(0, keep.nonzero()[:, 0], nll_tok)
    return nll, keep.sum(1)


def _batches(rows: list[dict], tok, cfg, device="cpu"):
    """Teacher-forced batches (right padding) on ``device``: (row indices, collated batch)."""
    exs = [tokenize_example(r, tok, cfg.max_length)[0] for r in rows]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for s in range(0, len(rows), cfg.loss_batch_size):
        b = collate(exs[s:s + cfg.loss_batch_size], pad)
        yield list(range(s, min(len(rows), s + cfg.loss_batch_size))), {k: v.to(device) for k, v in b.items()}


def _forward(target: Target, b: dict):
    """Teacher-forced logits (B, T, V). Sequence routing reads the prompt tokens only, as at generation."""
    spec = target.spec
    if spec is not None and spec.routing.granularity == "sequence":
        from .moe.routing import sequence_mask

        prompt = b["attention_mask"].bool() & (b["labels"] == IGNORE_INDEX)
        empty = ~prompt.any(1)  # text rows have no prompt: their whole text is the sequence
        prompt[empty] = b["attention_mask"].bool()[empty]
        with sequence_mask(target.model, prompt.long()):
            return target.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return target.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def row_losses(target: Target, rows: list[dict], cfg, routing: dict | None, reporter: Reporter,
               task: str = "loss") -> list[tuple[float, int]]:
    """(summed answer-token NLL, n tokens) per row; records routing weights per row into ``routing``."""
    import torch

    out: list[tuple[float, int]] = []
    for idx, b in _batches(rows, target.tokenizer, cfg, target.device):
        with torch.no_grad():
            if routing is not None:
                with target.record_routing() as rec:
                    logits = _forward(target, b)
                _collect_routing(target, rec, b["attention_mask"], [rows[i] for i in idx], routing)
            else:
                logits = _forward(target, b)
        nll, n = _row_nll(logits, b["labels"])
        out.extend(zip(nll.tolist(), n.tolist()))
        reporter.advance(task, len(idx))
    return out


def _collect_routing(target: Target, rec, mask, rows: list[dict], acc: dict) -> None:
    """Add each row's mean expert weights per layer (over its real tokens) to ``acc[task]``.

    ``rec.records[layer]`` holds one (pi, mask) per forward: pi (B, T, S) token / (B, 1, S) sequence routing.
    """
    m = mask.float().cpu()  # the recorder keeps its tensors on the CPU
    for layer, recs in sorted(rec.records.items()):
        pi = recs[-1][0].float()
        if pi.shape[1] == m.shape[1] and pi.shape[1] > 1:  # token routing: mean over real tokens
            w = (pi * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
        else:  # sequence routing: one mixture per row
            w = pi[:, 0].expand(m.shape[0], -1)
        ew = expert_weights(target.spec, layer, w)  # (B, n_experts)
        for j, row in enumerate(rows):
            acc.setdefault(row["task"], {}).setdefault(layer, []).append(ew[j])


def general_shift(target: Target, rows: list[dict], cfg, reporter: Reporter) -> dict[str, Any]:
    """KL(base || target) per answer token and perplexity ratio target/base on general rows."""
    import torch

    kl = nll_b = nll_t = 0.0
    n_tok = 0
    for idx, b in _batches(rows, target.tokenizer, cfg, target.device):
        with torch.no_grad():
            with target.base_mode():
                lb = _forward(target, b)
            lt = _forward(target, b)
        pos = torch.zeros_like(b["labels"], dtype=torch.bool)
        pos[:, :-1] = b["labels"][:, 1:] != IGNORE_INDEX  # positions that predict an answer token
        k, n = M.token_kl_sum(lb, lt, pos)
        kl += k
        n_tok += n
        nll_b += M.nll_sum(lb, b["labels"])[0]
        nll_t += M.nll_sum(lt, b["labels"])[0]
        reporter.advance("general shift", len(idx))
    return {"kl": kl / n_tok if n_tok else None, "ppl_ratio": M.perplexity_ratio(nll_b, nll_t, n_tok),
            "base_ppl": M.perplexity(nll_b, n_tok), "target_ppl": M.perplexity(nll_t, n_tok), "n_tokens": n_tok}
