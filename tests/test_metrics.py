"""Oracle tests for lorax_cil.evaluation.metrics (hand-computed values)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lorax_cil.evaluation.metrics import (
    AccuracyMatrix,
    accuracy,
    average_accuracy,
    average_accuracy_per_step,
    average_precision,
    backward_transfer,
    binary_correct,
    evaluate_predictions,
    fakeness_score,
    forgetting,
    last_completed_step,
    multi_real_correct,
    prediction_metrics,
    roc_auc,
    step_average_accuracy,
    strict_correct,
    summarize_matrix,
)

nan = float("nan")

# R[j, i]: accuracy on task i after training task j.
R3 = np.array(
    [
        [0.90, nan, nan],
        [0.95, 0.80, nan],
        [0.50, 0.70, 0.90],
    ]
)
# By hand:
#   AA        = (0.50 + 0.70 + 0.90) / 3                        = 0.7
#   per step  = [0.90, (0.95 + 0.80) / 2, 0.7] = [0.9, 0.875, 0.7]
#   step avg  = (0.9 + 0.875 + 0.7) / 3                         = 0.825
#   BWT       = ((0.50 - 0.90) + (0.70 - 0.80)) / 2             = -0.25
#   forgetting= ((max(0.90, 0.95) - 0.50) + (0.80 - 0.70)) / 2  = 0.275  (differs from -BWT)
R3_EXPECTED = {"aa": 0.7, "step_average_accuracy": 0.825, "bwt": -0.25, "forgetting": 0.275}


def _assert_summary(R, expected):
    got = summarize_matrix(R)
    assert set(got) == {"aa", "step_average_accuracy", "bwt", "forgetting"}
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, abs=1e-12), key


def test_matrix_summaries_hand_computed():
    _assert_summary(R3, R3_EXPECTED)
    assert average_accuracy(R3) == pytest.approx(0.7)
    assert step_average_accuracy(R3) == pytest.approx(0.825)
    assert backward_transfer(R3) == pytest.approx(-0.25)
    assert forgetting(R3) == pytest.approx(0.275)
    np.testing.assert_allclose(average_accuracy_per_step(R3), [0.9, 0.875, 0.7])


def test_matrix_summaries_4x4_percent_free_integers():
    # Values k/10 so every number below is exact to write by hand.
    R = np.array(
        [
            [1.0, nan, nan, nan],
            [0.8, 0.9, nan, nan],
            [0.6, 0.9, 1.0, nan],
            [0.4, 0.5, 0.8, 0.6],
        ]
    )
    # AA = (0.4+0.5+0.8+0.6)/4 = 0.575
    # per step: 1.0, 0.85, 2.5/3, 0.575 -> mean = (1.0+0.85+0.833333..+0.575)/4 = 0.8145833..
    # BWT = ((0.4-1.0) + (0.5-0.9) + (0.8-1.0)) / 3 = -1.2/3 = -0.4
    # forgetting = ((1.0-0.4) + (0.9-0.5) + (1.0-0.8)) / 3 = 0.4
    _assert_summary(
        R,
        {"aa": 0.575, "step_average_accuracy": (1.0 + 0.85 + 2.5 / 3 + 0.575) / 4, "bwt": -0.4,
         "forgetting": 0.4},
    )


def test_values_above_diagonal_are_ignored():
    noisy = R3.copy()
    noisy[0, 1], noisy[0, 2], noisy[1, 2] = 0.123, 0.0, 1.0
    _assert_summary(noisy, R3_EXPECTED)


def test_single_task_gives_nan_bwt_and_forgetting():
    _assert_summary(np.array([[0.8]]), {"aa": 0.8, "step_average_accuracy": 0.8, "bwt": nan,
                                        "forgetting": nan})


def test_partial_matrix_summarises_last_completed_step():
    partial = R3.copy()
    partial[2, :] = nan  # step 2 not trained yet
    # T_eff = 2: AA = (0.95+0.80)/2 = 0.875; step avg = (0.9+0.875)/2 = 0.8875
    # BWT = 0.95 - 0.90 = 0.05; forgetting = max(0.90) - 0.95 = -0.05
    assert last_completed_step(partial) == 1
    _assert_summary(partial, {"aa": 0.875, "step_average_accuracy": 0.8875, "bwt": 0.05,
                              "forgetting": -0.05})


def test_empty_and_missing_entries_are_nan_not_zero():
    empty = np.full((3, 3), nan)
    assert last_completed_step(empty) == -1
    _assert_summary(empty, {"aa": nan, "step_average_accuracy": nan, "bwt": nan, "forgetting": nan})
    holed = R3.copy()
    holed[2, 1] = nan  # task 1 not evaluated after the last step
    assert math.isnan(average_accuracy(holed))
    assert math.isnan(backward_transfer(holed))
    with pytest.raises(ValueError, match="square"):
        average_accuracy(np.zeros((2, 3)))


# ----------------------------------------------------------------- per-sample correctness
# A class order where fake is NOT the odd label: A = (fake 0, real 1), B = (real 2, fake 3),
# C = (fake 4, real 5).
CLASS_IS_FAKE = np.array([True, False, False, True, True, False])
CLASS_TASK = np.array([0, 0, 1, 1, 2, 2])
LABEL = np.array([1, 1, 2, 0, 0, 3, 4, 5])
PRED = np.array([2, 1, 0, 0, 3, 5, 4, 1])
#                                     multi  binary strict
# real_A -> real_B                      T      T      F
# real_A -> real_A                      T      T      T
# real_B -> fake_A                      F      F      F
# fake_A -> fake_A                      T      T      T
# fake_A -> fake_B                      F      T      F
# fake_B -> real_C                      F      F      F
# fake_C -> fake_C                      T      T      T
# real_C -> real_A                      T      T      F
MULTI = [True, True, False, True, False, False, True, True]
BINARY = [True, True, False, True, True, False, True, True]
STRICT = [False, True, False, True, False, False, True, False]


def test_correctness_rules_on_hand_table():
    np.testing.assert_array_equal(multi_real_correct(PRED, LABEL, CLASS_IS_FAKE), MULTI)
    np.testing.assert_array_equal(binary_correct(PRED, LABEL, CLASS_IS_FAKE), BINARY)
    np.testing.assert_array_equal(strict_correct(PRED, LABEL, CLASS_IS_FAKE), STRICT)
    assert accuracy(MULTI) == 5 / 8
    assert accuracy(BINARY) == 6 / 8
    assert accuracy(STRICT) == 3 / 8
    assert math.isnan(accuracy([]))


def test_no_parity_decoding():
    parity_table = np.arange(6) % 2 == 1  # what a parity decoder would assume
    assert accuracy(multi_real_correct(PRED, LABEL, parity_table)) != 5 / 8
    assert not np.array_equal(binary_correct(PRED, LABEL, parity_table), BINARY)
    # Relabelling classes consistently (permuting table and labels) keeps every metric.
    perm = np.array([3, 0, 5, 1, 2, 4])  # new index of old class c is perm[c]
    table = np.empty(6, bool)
    table[perm] = CLASS_IS_FAKE
    np.testing.assert_array_equal(multi_real_correct(perm[PRED], perm[LABEL], table), MULTI)
    np.testing.assert_array_equal(binary_correct(perm[PRED], perm[LABEL], table), BINARY)


@pytest.mark.parametrize("seed", range(3))
def test_strict_implies_multi_real_implies_binary(seed):
    rng = np.random.default_rng(seed)
    table = rng.random(10) < 0.5
    table[:2] = [False, True]
    pred, label = rng.integers(0, 10, 200), rng.integers(0, 10, 200)
    s = strict_correct(pred, label, table)
    m = multi_real_correct(pred, label, table)
    b = binary_correct(pred, label, table)
    assert not (s & ~m).any() and not (m & ~b).any()


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="outside"):
        multi_real_correct([6], [0], CLASS_IS_FAKE)
    with pytest.raises(ValueError, match="length"):
        binary_correct([0, 1], [0], CLASS_IS_FAKE)
    with pytest.raises(ValueError, match="booleans"):
        binary_correct([0], [0], [0, 2])


def test_evaluate_predictions_per_task():
    task_id = CLASS_TASK[LABEL]
    is_fake = CLASS_IS_FAKE[LABEL]
    out = evaluate_predictions(PRED, LABEL, None, task_id, is_fake, CLASS_IS_FAKE, CLASS_TASK)
    assert sorted(out) == [0, 1, 2]
    # task 0 samples: real_A->real_B, real_A->real_A, fake_A->fake_A, fake_A->fake_B
    assert out[0]["multi_real"] == 0.75 and out[0]["binary"] == 1.0 and out[0]["strict"] == 0.5
    assert out[1]["multi_real"] == 0.0 and out[1]["binary"] == 0.0 and out[1]["strict"] == 0.0
    assert out[2]["multi_real"] == 1.0 and out[2]["binary"] == 1.0 and out[2]["strict"] == 0.5
    assert [out[t]["n"] for t in (0, 1, 2)] == [4, 2, 2]
    assert all(math.isnan(out[t]["ap"]) for t in out)
    with pytest.raises(ValueError, match="is_fake disagrees"):
        evaluate_predictions(PRED, LABEL, None, task_id, ~is_fake, CLASS_IS_FAKE, CLASS_TASK)
    with pytest.raises(ValueError, match="task_id disagrees"):
        evaluate_predictions(PRED, LABEL, None, task_id + 1, is_fake, CLASS_IS_FAKE, CLASS_TASK)


def test_evaluate_predictions_ap_matches_per_task_scores():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(6), size=LABEL.size)
    task_id = CLASS_TASK[LABEL]
    out = evaluate_predictions(PRED, LABEL, probs, task_id, CLASS_IS_FAKE[LABEL], CLASS_IS_FAKE)
    scores = fakeness_score(probs, CLASS_IS_FAKE)
    for t in (0, 1, 2):
        m = task_id == t
        assert out[t]["ap"] == pytest.approx(average_precision(scores[m], CLASS_IS_FAKE[LABEL][m]))
    # Task 1 has one real and one fake sample: AP is defined there.
    assert not math.isnan(out[1]["ap"])
    assert prediction_metrics(PRED, LABEL, CLASS_IS_FAKE)["multi_real"] == 5 / 8


# ----------------------------------------------------------------- scores, AP, AUC
def test_fakeness_score_hand_value():
    probs = np.array([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])
    table = np.array([True, False, False, True])
    np.testing.assert_allclose(fakeness_score(probs, table), [0.4 / 0.7, 0.7 / 0.8])
    assert np.isnan(fakeness_score(np.zeros((1, 4)), table)[0])
    with pytest.raises(ValueError, match="real and one fake"):
        fakeness_score(probs, np.ones(4, bool))


def test_ap_auc_hand_values():
    # scores sorted: 0.9 (F), 0.8 (R), 0.7 (F), 0.1 (R)
    scores, fake = [0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]
    # AP = 0.5 * 1/1 + 0.5 * 2/3 = 0.8333..; AUC = 3 of 4 (fake, real) pairs ordered = 0.75
    assert average_precision(scores, fake) == pytest.approx(0.5 + 1 / 3)
    assert roc_auc(scores, fake) == pytest.approx(0.75)
    # all tied: AUC 0.5, AP = prevalence
    assert roc_auc([0.3] * 4, fake) == pytest.approx(0.5)
    assert average_precision([0.3] * 4, fake) == pytest.approx(0.5)
    for one_class in ([1, 1, 1, 1], [0, 0, 0, 0]):
        assert math.isnan(average_precision(scores, one_class))
        assert math.isnan(roc_auc(scores, one_class))
    assert math.isnan(average_precision([], []))
    with pytest.raises(ValueError, match="finite"):
        roc_auc([nan, 0.1], [0, 1])


@pytest.mark.parametrize("seed", range(8))
def test_ap_auc_equal_sklearn(seed):
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    y = rng.random(n) < rng.uniform(0.1, 0.9)
    if y.all() or not y.any():
        y[0] = not y[0]
    scores = rng.random(n) + 0.5 * y
    if seed % 2:  # many ties
        scores = np.round(scores, 1)
    expected = sk.average_precision_score(y, scores)
    assert average_precision(scores, y) == pytest.approx(expected, abs=1e-12)
    assert roc_auc(scores, y) == pytest.approx(sk.roc_auc_score(y, scores), abs=1e-12)


# ----------------------------------------------------------------- AccuracyMatrix
def _filled(names=("gau gan", "big,gan", "wild")):
    am = AccuracyMatrix(3, task_names=list(names))
    for (j, i), v in np.ndenumerate(R3):
        if not math.isnan(v):
            am.set(j, i, v)
    return am


def test_accuracy_matrix_basics():
    am = _filled()
    np.testing.assert_array_equal(am.matrix, R3)
    assert am.summary() == pytest.approx(R3_EXPECTED)
    m = am.matrix
    m[0, 0] = 0.0
    assert am.get(0, 0) == 0.9  # .matrix is a copy
    frame = am.to_frame()
    assert list(frame.columns) == ["gau gan", "big,gan", "wild"]
    assert list(frame.index) == ["after gau gan", "after big,gan", "after wild"]
    with pytest.raises(ValueError, match="above the diagonal"):
        am.set(0, 1, 0.5)
    with pytest.raises(ValueError, match="expand"):
        am.set(3, 0, 0.5)
    with pytest.raises(ValueError, match="fraction"):
        am.set(1, 0, 95.0)
    with pytest.raises(ValueError, match="unique"):
        AccuracyMatrix(2, task_names=["a", "a"])
    assert AccuracyMatrix(2).task_names == ("task0", "task1")


def test_accuracy_matrix_csv_round_trip(tmp_path):
    am = _filled()
    am.set(2, 1, 1 / 3)  # not representable in short decimal: must survive exactly
    path = am.to_csv(tmp_path / "sub" / "acc.csv")
    back = AccuracyMatrix.from_csv(path)
    assert back == am
    assert back.task_names == am.task_names
    np.testing.assert_array_equal(back.matrix, am.matrix)
    with pytest.raises(FileNotFoundError):
        AccuracyMatrix.from_csv(tmp_path / "missing.csv")


def test_accuracy_matrix_partial_and_expand(tmp_path):
    am = AccuracyMatrix(2, task_names=["gaugan", "biggan"])
    am.set(0, 0, 0.9)
    assert am.last_step == 0
    assert am.summary()["aa"] == pytest.approx(0.9)
    assert math.isnan(am.summary()["bwt"])
    am.set(1, 0, 0.95)
    am.set(1, 1, 0.8)
    am.expand(3, ["wild"])  # a new task added to a finished run
    assert am.num_tasks == 3 and am.task_names == ("gaugan", "biggan", "wild")
    assert am.last_step == 1
    assert am.summary()["aa"] == pytest.approx(0.875)  # still the last completed step
    am.set(2, 0, 0.5)
    am.set(2, 1, 0.7)
    am.set(2, 2, 0.9)
    assert am.summary() == pytest.approx(R3_EXPECTED)
    am.expand(5, ["gaugan", "biggan", "wild", "san", "crn"])  # full list form
    assert am.task_names[-2:] == ("san", "crn")
    am.expand(6)
    assert am.task_names[-1] == "task5"
    assert AccuracyMatrix.from_csv(am.to_csv(tmp_path / "m.csv")) == am
    with pytest.raises(ValueError, match="shrink"):
        am.expand(2)
    with pytest.raises(ValueError, match="added tasks"):
        am.expand(8, ["x"])
