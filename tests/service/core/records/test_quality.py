"""Quality figures from reviewed parts, against numbers worked by hand (service/core/records/quality.py)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, f1_score

from service.core.records.quality import candidates, confusion, report, suggest_threshold, sweep

# four good parts and three defective ones; at 0.5 the good 0.6 is a false call and the defective 0.4 escapes
GOOD = [0.1, 0.2, 0.3, 0.6]
BAD = [0.4, 0.7, 0.8]
SCORES = GOOD + BAD
DEFECTIVE = [False] * 4 + [True] * 3


def test_confusion_at_the_threshold_in_force() -> None:
    c = confusion(SCORES, DEFECTIVE, 0.5)
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 1, 1, 3)
    assert c.escape_rate == pytest.approx(1 / 3)
    assert c.false_call_rate == pytest.approx(1 / 4)
    assert c.precision == pytest.approx(2 / 3)
    assert c.recall == pytest.approx(2 / 3)
    assert c.f1 == pytest.approx(4 / 6)  # 2tp / (2tp + fp + fn)


def test_a_score_equal_to_the_threshold_passes() -> None:
    c = confusion([0.5, 0.5], [False, True], 0.5)
    assert (c.tp, c.fp, c.fn, c.tn) == (0, 0, 1, 1)
    assert c.precision is None  # nothing flagged
    assert c.escape_rate == 1.0 and c.false_call_rate == 0.0 and c.f1 == 0.0


def test_candidates_are_the_gaps_midpoints_and_both_ends() -> None:
    assert candidates(np.array(SCORES)) == pytest.approx([0.05, 0.15, 0.25, 0.35, 0.5, 0.65, 0.75, 0.9])
    assert candidates(np.array([0.5, 0.5])) == pytest.approx([0.25, 0.75])


def test_sweep_counts_at_each_cut() -> None:
    got = [(c.threshold, c.tp, c.fp, c.fn, c.tn) for c in sweep(SCORES, DEFECTIVE)]
    want = [(0.05, 3, 4, 0, 0), (0.15, 3, 3, 0, 1), (0.25, 3, 2, 0, 2), (0.35, 3, 1, 0, 3),
            (0.5, 2, 1, 1, 3), (0.65, 2, 0, 1, 4), (0.75, 1, 0, 2, 4), (0.9, 0, 0, 3, 4)]
    assert [g[1:] for g in got] == [w[1:] for w in want]
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want])


def test_sweep_agrees_with_scikit_learn_on_random_parts() -> None:
    rng = np.random.default_rng(0)
    scores = np.round(rng.uniform(0.05, 0.95, 300), 2)  # rounded: many ties
    defective = rng.uniform(size=300) < scores
    for c in sweep(scores, defective):
        flagged = scores > c.threshold
        tn, fp, fn, tp = confusion_matrix(defective, flagged, labels=[False, True]).ravel()
        assert (c.tp, c.fp, c.fn, c.tn) == (tp, fp, fn, tn)
        assert c.f1 == pytest.approx(f1_score(defective, flagged, zero_division=0.0))


def test_best_f1() -> None:
    # F1 by cut: 6/10, 6/9, 6/8, 6/7, 4/6, 4/5, 2/4, 0: the best is 0.35 (every defective part caught, one false call)
    s = suggest_threshold(SCORES, DEFECTIVE)
    assert s is not None and s.rule == "best_f1"
    assert s.threshold == pytest.approx(0.35)
    assert s.confusion.f1 == pytest.approx(6 / 7)
    assert s.confusion.escape_rate == 0.0 and s.confusion.false_call_rate == pytest.approx(1 / 4)


def test_best_f1_tie_goes_to_the_lower_escape_rate() -> None:
    # cut 0.15 flags all (tp 2, fp 2: F1 4/6); cut 0.7 catches 0.9 only (tp 1, fn 1: F1 2/3), which escapes 0.3
    s = suggest_threshold([0.3, 0.9, 0.4, 0.5], [True, True, False, False])
    assert s is not None
    assert s.threshold == pytest.approx(0.15) and s.confusion.escape_rate == 0.0


@pytest.mark.parametrize(("target", "threshold", "escape", "false_call"), [
    (0.0, 0.35, 0.0, 1 / 4),    # no escape allowed: one false call is the price
    (0.2, 0.35, 0.0, 1 / 4),    # one escape in three is 0.33 > 0.2
    (0.34, 0.65, 1 / 3, 0.0),   # one escape allowed: no false call left
    (1.0, 0.65, 1 / 3, 0.0),    # anything goes: 0.65, 0.75 and 0.9 make no false call; the lowest escape wins
])
def test_lowest_false_call_rate_at_an_escape_target(target: float, threshold: float, escape: float,
                                                    false_call: float) -> None:
    s = suggest_threshold(SCORES, DEFECTIVE, escape_target=target)
    assert s is not None and s.rule == "escape_target"
    assert s.threshold == pytest.approx(threshold)
    assert s.confusion.escape_rate == pytest.approx(escape)
    assert s.confusion.false_call_rate == pytest.approx(false_call)


def test_no_suggestion_without_both_kinds() -> None:
    assert suggest_threshold(GOOD, [False] * 4) is None
    assert suggest_threshold(BAD, [True] * 3) is None
    assert suggest_threshold([], []) is None


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="3 scores but 2 labels"):
        confusion([0.1, 0.2, 0.3], [True, False], 0.5)
    with pytest.raises(ValueError, match="finite"):
        sweep([0.1, float("nan")], [True, False])
    with pytest.raises(ValueError, match="escape_target"):
        suggest_threshold(SCORES, DEFECTIVE, escape_target=1.5)


def test_report_at_the_threshold_in_force_with_a_target() -> None:
    r = report(0.5, SCORES, DEFECTIVE, escape_target=0.34)
    assert (r["reviewed"], r["defective"], r["good"]) == (7, 3, 4)
    assert {k: r["at_threshold"][k] for k in ("tp", "fp", "fn", "tn")} == {"tp": 2, "fp": 1, "fn": 1, "tn": 3}
    assert r["suggested"]["rule"] == "escape_target" and r["suggested"]["threshold"] == pytest.approx(0.65)
    assert r["best_f1"]["threshold"] == pytest.approx(0.35) and r["best_f1"]["f1"] == pytest.approx(6 / 7)
    plain = report(0.5, GOOD, [False] * 4)
    assert plain["suggested"] is None and plain["best_f1"] is None
    assert plain["at_threshold"]["false_call_rate"] == 0.25 and plain["at_threshold"]["escape_rate"] is None
