"""Metrics on hand-made predictions: normalisation, label extraction, metric choice, ROUGE-L,
retention arithmetic, KL and perplexity shift."""

from __future__ import annotations

import math

import pytest
import torch

from mergekit_moe import metrics as M


def test_normalize_and_exact_match():
    assert M.normalize_answer("  The Pneumonia. ") == "pneumonia"
    assert M.normalize_answer("Major -- (CYP3A4)") == "major cyp3a4"
    # numbers keep sign and decimal point; hyphens between words do not
    assert M.normalize_answer("-46.") == "-46" and M.normalize_answer("x = 3.5") == "x 3.5"
    assert M.normalize_answer("L3-L4 well-known") == "l3 l4 well known"
    assert M.exact_match("-46", "46") == 0.0 and M.exact_match("The answer: -46.", "the answer -46") == 1.0
    assert M.exact_match("Pneumonia.\nMore text the model rambled on with", "pneumonia") == 1.0
    assert M.exact_match("bronchitis", "pneumonia") == 0.0
    # empty prediction is wrong, not an error
    assert M.exact_match("", "pneumonia") == 0.0


def test_answer_head_cuts_at_separators():
    assert M.answer_head("major: CYP3A4 inhibition raises simvastatin levels") == "major"
    assert M.answer_head("Moderate (additive QT prolongation)") == "moderate"
    assert M.answer_head("none - no known interaction") == "none"
    assert M.answer_head("\n\nminor; slight\nsecond line") == "minor"
    # a hyphen inside a word is not a separator
    assert M.answer_head("community-acquired pneumonia") == "community acquired pneumonia"


def test_label_set_detected_from_full_answers():
    golds = ["pneumonia", "Meningitis", "pneumonia.", "asthma", "meningitis", "asthma", "pneumonia", "asthma"]
    metric, labels = M.choose_metric(golds)
    assert metric == M.ACCURACY
    assert labels.mode == "full"
    assert labels.labels == ("asthma", "meningitis", "pneumonia")


def test_label_set_detected_from_heads():
    golds = [f"{c}: mechanism number {i}" for i, c in enumerate(["major", "minor", "none", "moderate"] * 3)]
    metric, labels = M.choose_metric(golds)
    assert metric == M.ACCURACY and labels.mode == "head"
    assert set(labels.labels) == {"major", "minor", "moderate", "none"}
    assert labels.gold_label("Major: whatever") == "major"


def test_free_text_gets_rouge():
    golds = [f"Impression: finding {w} in the {s} lobe" for w, s in
             zip(["opacity", "nodule", "effusion", "mass", "scarring", "collapse"],
                 ["left", "right", "upper", "lower", "middle", "left"])]
    # every head is "impression": one shared prefix, not a label set
    metric, labels = M.choose_metric(golds)
    assert metric == M.ROUGE_L and labels is None
    # all distinct short answers: no repetition, so no label set either
    assert M.choose_metric(["a1", "b2", "c3", "d4", "e5", "f6"])[0] == M.ROUGE_L
    # too few rows to tell
    assert M.choose_metric(["yes", "no", "yes"])[0] == M.ROUGE_L


def test_metric_override():
    golds = ["yes", "no", "yes", "no", "yes"]
    assert M.choose_metric(golds, "rougeL") == (M.ROUGE_L, None)
    metric, labels = M.choose_metric(["ax 1", "by 2", "cz 3", "dw 4"], "accuracy")
    assert metric == M.ACCURACY and set(labels.labels) == {"ax 1", "by 2", "cz 3", "dw 4"}
    assert M.score_prediction("BY 2.", "by 2", metric, labels) == 1.0
    with pytest.raises(ValueError, match="unknown metric"):
        M.choose_metric(golds, "bleu")


def test_label_extraction_from_predictions():
    labels = M.LabelSet(("asthma", "meningitis", "pneumonia", "viral pneumonia"), "full")
    assert labels.extract("Pneumonia") == "pneumonia"
    assert labels.extract("Diagnosis: meningitis, most likely.") == "meningitis"
    # the earliest label wins; at the same position the longer one
    assert labels.extract("I think viral pneumonia or asthma") == "viral pneumonia"
    assert labels.extract("asthma rather than pneumonia") == "asthma"
    # only the first line counts
    assert labels.extract("not sure\npneumonia") == ""
    # whole words only
    assert labels.extract("asthmatic bronchitis") == ""
    # head mode: a label word in the explanation after the separator is not the answer
    heads = M.LabelSet(("major", "moderate", "none"), "head")
    assert heads.extract("minor: none of the major pathways") == ""
    assert heads.extract("probably major: CYP3A4") == "major"


def test_accuracy_scores_on_handmade_predictions():
    golds = ["major: bleeding risk", "minor: none to speak of", "none: no interaction", "major: QT", "minor: x", "none: y"]
    preds = ["Major: increased bleeding", "moderate: something", "none", "Interaction class: major", "", "none: y"]
    metric, labels = M.choose_metric(golds)
    scores = [M.score_prediction(p, g, metric, labels) for p, g in zip(preds, golds)]
    assert scores == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0]


def test_rouge_l_values():
    assert M.rouge_l("no acute abnormality", "no acute cardiopulmonary abnormality") == pytest.approx(2 * 1.0 * 0.75 / 1.75)
    assert M.rouge_l("", "") == 1.0
    assert M.rouge_l("completely different", "stable findings") == 0.0
    # stemming: "findings" ~ "finding"
    assert M.rouge_l("stable finding", "Stable findings.") == pytest.approx(1.0)
    assert M.score_prediction("stable finding", "Stable findings.", M.ROUGE_L) == pytest.approx(1.0)


def test_is_correct_for_free_text():
    assert M.is_correct("The capital of France is Paris.", "Paris")
    assert M.is_correct("To add 94 and 21, we add the units.\n94 + 21 = 115", "115")  # after a preamble
    assert not M.is_correct("Lyon", "Paris")
    assert not M.is_correct("Parisian food", "Paris")  # whole words only
    assert M.is_correct("water boils at 100 degrees", "Water boils at 100 degrees Celsius.")  # ROUGE-L 0.91
    # short and numeric golds must appear exactly (ROUGE would equate -46 and 46)
    assert M.is_correct("It is -46.", "-46") and not M.is_correct("46", "-46")
    assert not M.is_correct("Paris France", "Paris, Texas")
    labels = M.LabelSet(("no", "yes"), "full")
    assert M.is_correct("Yes.", "yes", M.ACCURACY, labels)
    assert not M.is_correct("no", "yes", M.ACCURACY, labels)


def test_retention_arithmetic():
    base = [True, True, True, False, True, False]
    target = [True, False, True, True, True, False]
    r = M.retention(base, target)
    assert (r.n_probes, r.base_correct, r.target_correct, r.kept) == (6, 4, 4, 3)
    assert r.share == pytest.approx(0.75)
    assert r.to_dict()["share"] == pytest.approx(0.75)
    assert M.retention([False, False], [True, True]).share is None
    with pytest.raises(ValueError):
        M.retention([True], [True, False])


def test_kl_is_zero_for_identical_and_matches_closed_form():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    total, n = M.token_kl_sum(logits, logits.clone(), mask)
    assert n == 3 and total == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 3, 5)
    total, n = M.token_kl_sum(logits, other, mask)
    p = torch.softmax(logits, -1)
    q = torch.softmax(other, -1)
    ref = sum(float((p[b, t] * (p[b, t].log() - q[b, t].log())).sum()) for b, t in [(0, 0), (0, 1), (1, 0)])
    assert total == pytest.approx(ref, rel=1e-5)
    assert total > 0


def test_nll_and_perplexity_ratio():
    # a model that puts probability 1/2 on every correct next token
    V = 4
    labels = torch.tensor([[-100, 1, 2, -100]])
    logits = torch.full((1, 4, V), -1e9)
    logits[0, 0, 1] = 0.0
    logits[0, 0, 3] = 0.0
    logits[0, 1, 2] = 0.0
    logits[0, 1, 0] = 0.0
    nll, n = M.nll_sum(logits, labels)
    assert n == 2 and nll == pytest.approx(2 * math.log(2), rel=1e-5)
    assert M.perplexity(nll, n) == pytest.approx(2.0, rel=1e-5)
    assert M.perplexity_ratio(nll, nll + 2 * math.log(3), n) == pytest.approx(3.0)
    assert M.perplexity_ratio(1.0, 1.0, 0) is None
    assert M.nll_sum(logits, torch.full((1, 4), -100)) == (0.0, 0)
