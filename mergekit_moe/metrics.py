"""Evaluation metrics: normalised exact match, label extraction, ROUGE-L, retention, KL/perplexity shift.

Pure functions over strings and tensors, so anyone can recompute the scores from the
predictions JSONL that ``moemerge eval`` writes.

Which metric a task gets is decided from its gold answers, never from its name:
if the answers (or their heads: the first line cut at a separator such as ``:``, ``;``, ``(``, ``" - "``)
come from a small fixed label set, the task is scored by *accuracy* on the extracted label;
otherwise by *ROUGE-L* F1 (rouge-score, Porter stemming). ROUGE-L is reported for every task as
a secondary score either way.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

ACCURACY = "accuracy"
ROUGE_L = "rougeL"
EXACT_MATCH = "exact_match"
METRICS = (ACCURACY, ROUGE_L, EXACT_MATCH)

#: where a label ends inside an answer: "major: CYP3A4 inhibition", "pneumonia (community-acquired)"
_HEAD_SPLIT = re.compile(r"\s*(?:[:;,(\[\n]|\s[-\u2013\u2014]\s|\.\s|=>|->)\s*")
_PUNCT = set(string.punctuation) | {"\u2013", "\u2014", "\u2019", "\u201c", "\u201d"}
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_WS = re.compile(r"\s+")

#: a "fixed label set": at least 2 labels, at most this many, short, and each seen twice on average
MAX_LABELS = 50
MAX_LABEL_WORDS = 6


_NUM_SIGN = re.compile(r"(?<![\w.])-(?=\d)")
_NUM_POINT = re.compile(r"(?<=\d)\.(?=\d)")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and English articles, collapse whitespace (SQuAD-style).

    Numbers keep their sign and decimal point (``-46`` is not ``46``, ``3.5`` is not ``3 5``).
    """
    text = (text or "").lower()
    text = _NUM_POINT.sub("\x01", _NUM_SIGN.sub("\x00", text))
    text = "".join(" " if ch in _PUNCT else ch for ch in text)
    text = text.replace("\x00", "-").replace("\x01", ".")
    text = _ARTICLES.sub(" ", text)
    return _WS.sub(" ", text).strip()


def first_line(text: str) -> str:
    """The first non-empty line of ``text`` (models often continue after the answer)."""
    for line in (text or "").strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def answer_head(text: str) -> str:
    """The label part of an answer: first line, cut at the first separator, normalised."""
    line = first_line(text)
    head = _HEAD_SPLIT.split(line, maxsplit=1)[0] if line else ""
    return normalize_answer(head)


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised first lines are equal, else 0.0."""
    return float(normalize_answer(first_line(prediction)) == normalize_answer(first_line(gold)))


@dataclass(frozen=True)
class LabelSet:
    """A task's fixed label set. ``mode``: ``full`` (whole first line is the label) or ``head``."""

    labels: tuple[str, ...]
    mode: str

    def gold_label(self, gold: str) -> str:
        return normalize_answer(first_line(gold)) if self.mode == "full" else answer_head(gold)

    def extract(self, prediction: str) -> str:
        """The label a prediction names: its first line, head or second field if that is a label, else the label
        mentioned earliest (longest wins at the same position), else ``""``.

        ``full`` mode searches the first line (``"Diagnosis: meningitis"``); ``head`` mode searches only
        the head, so a label word inside the explanation after the separator is never taken as the answer.
        """
        line = first_line(prediction)
        head = answer_head(line)
        parts = _HEAD_SPLIT.split(line, maxsplit=1)
        nxt = answer_head(parts[1]) if len(parts) > 1 else ""  # "Interaction class: major (...)"
        for cand in (normalize_answer(line), head, nxt):
            if cand in self.labels:
                return cand
        norm = f" {normalize_answer(line) if self.mode == 'full' else head} "
        best: tuple[int, int, str] | None = None
        for lab in self.labels:
            pos = norm.find(f" {lab} ") if lab else -1
            if pos >= 0 and (best is None or (pos, -len(lab)) < (best[0], best[1])):
                best = (pos, -len(lab), lab)
        return best[2] if best else ""


def _as_label_set(values: Sequence[str], n: int, mode: str) -> LabelSet | None:
    counts = Counter(values)
    k = len(counts)
    if "" in counts or k < 2 or k > MAX_LABELS or k > n / 2:
        return None
    if max(len(v.split()) for v in counts) > MAX_LABEL_WORDS:
        return None
    return LabelSet(tuple(sorted(counts)), mode)


def detect_label_set(golds: Sequence[str]) -> LabelSet | None:
    """A fixed label set if the gold answers come from one, else None (then ROUGE-L applies).

    Tries the whole first line first (``"pneumonia"``), then the head before a separator
    (``"major: CYP3A4 inhibition"`` -> ``"major"``). A single distinct head (``"Impression: ..."`` on
    every row) is a shared prefix, not a label set.
    """
    n = len(golds)
    if n < 4:
        return None
    full = [normalize_answer(first_line(g)) for g in golds]
    found = _as_label_set(full, n, "full")
    if found is None:
        found = _as_label_set([answer_head(g) for g in golds], n, "head")
    return found


def choose_metric(golds: Sequence[str], override: str | None = None) -> tuple[str, LabelSet | None]:
    """``(metric, label_set)`` for one task; ``override`` is one of :data:`METRICS`."""
    if override is not None:
        if override not in METRICS:
            raise ValueError(f"unknown metric {override!r}; choose one of {', '.join(METRICS)}")
        if override == ACCURACY:
            labels = detect_label_set(golds)
            if labels is None:  # forced accuracy without a detectable label set: every distinct answer is a label
                full = sorted({normalize_answer(first_line(g)) for g in golds} - {""})
                labels = LabelSet(tuple(full), "full")
            return ACCURACY, labels
        return override, None
    labels = detect_label_set(golds)
    return (ACCURACY, labels) if labels is not None else (ROUGE_L, None)


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, gold: str) -> float:
    """ROUGE-L F1 (rouge-score, stemmed) of the prediction against the gold text."""
    if normalize_answer(prediction) == normalize_answer(gold):
        # equal after normalisation (also covers two empty strings, which rouge-score scores 0)
        return 1.0
    return float(_scorer().score(gold or "", prediction or "")["rougeL"].fmeasure)


def score_prediction(prediction: str, gold: str, metric: str, labels: LabelSet | None = None) -> float:
    """The primary score of one prediction under ``metric`` (0..1)."""
    if metric == ACCURACY:
        if labels is None:
            return exact_match(prediction, gold)
        return float(labels.extract(prediction) == labels.gold_label(gold))
    if metric == EXACT_MATCH:
        return exact_match(prediction, gold)
    if metric == ROUGE_L:
        return rouge_l(prediction, gold)
    raise ValueError(f"unknown metric {metric!r}")


#: a free-text answer counts as correct (for retention) from this ROUGE-L on
CORRECT_ROUGE = 0.5


def is_correct(prediction: str, gold: str, metric: str = ROUGE_L, labels: LabelSet | None = None,
               threshold: float = CORRECT_ROUGE) -> bool:
    """Binary correctness of an answer, used for general-knowledge retention.

    Label tasks: the extracted label matches. Free text: the normalised gold appears as whole words
    in the prediction (``"Paris"`` in ``"The capital of France is Paris."``; a chatty model may state it
    after a preamble), or, for golds longer than three words, ROUGE-L of the first line >= threshold
    (a one-word or numeric answer must be there exactly: ROUGE's tokenizer equates ``-46`` and ``46``).
    """
    if metric == ACCURACY:
        return score_prediction(prediction, gold, metric, labels) >= 1.0
    g = normalize_answer(first_line(gold))
    p = normalize_answer(prediction)
    if g and f" {g} " in f" {p} ":
        return True
    return len(g.split()) > 3 and rouge_l(prediction, gold) >= threshold


@dataclass(frozen=True)
class Retention:
    """Of the probes the base answers correctly, how many the target still answers correctly."""

    n_probes: int
    base_correct: int
    target_correct: int
    kept: int  # correct for both base and target

    @property
    def share(self) -> float | None:
        """kept / base_correct, or None when the base answers no probe correctly."""
        return self.kept / self.base_correct if self.base_correct else None

    def to_dict(self) -> dict:
        return {"n_probes": self.n_probes, "base_correct": self.base_correct, "target_correct": self.target_correct,
                "kept": self.kept, "share": self.share}


def retention(base_correct: Sequence[bool], target_correct: Sequence[bool]) -> Retention:
    """Retention arithmetic over aligned per-probe correctness flags."""
    if len(base_correct) != len(target_correct):
        raise ValueError(f"{len(base_correct)} base flags vs {len(target_correct)} target flags")
    kept = sum(1 for b, t in zip(base_correct, target_correct) if b and t)
    return Retention(len(base_correct), sum(map(bool, base_correct)), sum(map(bool, target_correct)), kept)


def token_kl_sum(base_logits, target_logits, mask) -> tuple[float, int]:
    """Sum over masked positions of KL(base || target) of next-token distributions, and the count.

    Shapes: logits (B, T, V) float, mask (B, T) bool/0-1 (positions whose next-token distribution counts).
    KL(p||q) = sum_v p_v (log p_v - log q_v), computed in float32 with log-softmax (stable).
    """
    import torch

    m = mask.bool()
    # gather the counted positions first: the V-wide softmaxes then run on (N, V), not (B, T, V)
    lp = torch.log_softmax(base_logits[m].float(), dim=-1)
    lq = torch.log_softmax(target_logits[m].float(), dim=-1)
    # kl_div(input=log q, target=log p) = p (log p - log q), and 0 where p == 0 (no 0 * inf = nan)
    kl = torch.nn.functional.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)  # (N,)
    return float(kl.sum()), int(m.sum())


def nll_sum(logits, labels) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and token count; ``labels`` (B, T), -100 = ignored.

    Position t predicts ``labels[:, t+1]`` (the usual causal shift), logits (B, T, V).
    """
    import torch

    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    keep = shift_labels != -100
    if not bool(keep.any()):
        return 0.0, 0
    loss = torch.nn.functional.cross_entropy(shift_logits[keep], shift_labels[keep], reduction="sum")
    return float(loss), int(keep.sum())


def perplexity(nll_total: float, n_tokens: int) -> float | None:
    """exp(mean NLL), or None for zero tokens."""
    return math.exp(nll_total / n_tokens) if n_tokens else None


def perplexity_ratio(base_nll: float, target_nll: float, n_tokens: int) -> float | None:
    """ppl(target) / ppl(base) on the same tokens = exp((NLL_target - NLL_base) / n); 1.0 = no shift."""
    return math.exp((target_nll - base_nll) / n_tokens) if n_tokens else None


def mean(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
