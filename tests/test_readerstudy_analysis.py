"""Reader-study statistics: hand-computed means and t-intervals, the two-way bootstrap against its exact
distribution, paired differences, ICC(2,1) against Shrout & Fleiss (1979), validation and the written report."""

from __future__ import annotations

import csv
import itertools
import json
import math
import time

import numpy as np
import pytest

from medlatent.readerstudy.analysis import (
    AnalysisError,
    agreement,
    analyze,
    icc_2_1,
    paired_difference,
    summarize,
    t_quantile,
)
from medlatent.readerstudy.questions import QUESTIONS

# 2 readers × 3 cases, method A at factor 16 (reader → scores for cases c1, c2, c3):
#   fidelity  r1: 2 1 0    r2: 1 1 -1
#   features  r1: 0 2 1    r2: 1 2  0
#   artifacts all 2
# Method B answers every (reader, case) exactly 1 lower than A on every question.
A_SCORES = {
    "fidelity": {"r1": (2, 1, 0), "r2": (1, 1, -1)},
    "features": {"r1": (0, 2, 1), "r2": (1, 2, 0)},
    "artifacts": {"r1": (2, 2, 2), "r2": (2, 2, 2)},
}
CASES = ("c1", "c2", "c3")


def known_records(extra: bool = False) -> list[dict]:
    records = []
    for method, offset in (("A", 0), ("B", -1)):
        for reader in ("r1", "r2"):
            for ci, case in enumerate(CASES):
                rec = dict(reader=reader, case=case, method=method, factor="16")
                rec.update({q: A_SCORES[q][reader][ci] + offset for q in QUESTIONS})
                if extra:
                    rec["timestamp"] = f"2025-01-0{ci + 1}T10:00:00"
                records.append(rec)
    return records


def row(rows: list[dict], **match) -> dict:
    (found,) = [r for r in rows if all(r[k] == v for k, v in match.items())]
    return found


# ------------------------------------------------------------------------------------------ t quantile


@pytest.mark.parametrize(
    "df,expected", [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (10, 2.228), (1e6, 1.95996)]
)
def test_t_quantile_matches_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-3 if df < 1e6 else 1e-5)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=1e-3)


# ------------------------------------------------------------------------------------------- summarize


def test_summarize_hand_computed_means_and_t_interval():
    rows = summarize(known_records(), ci="t")
    assert [(r["method"], r["question"]) for r in rows] == [(m, q) for m in "AB" for q in QUESTIONS]
    a_fid = row(rows, method="A", question="fidelity")
    assert (a_fid["n_answers"], a_fid["n_cases"], a_fid["n_readers"], a_fid["ci_method"]) == (6, 3, 2, "t")
    # A fidelity: answers 2+1+0+1+1−1 = 4 over 6 → 0.6667. Case means 1.5, 1.0, −0.5 → mean 0.6667;
    # deviations 0.8333, 0.3333, −1.1667 → SS 2.1667, var 1.0833, sd 1.0408, se 1.0408/√3 = 0.6009;
    # t(0.975, 2) = 4.3027 → half-width 2.5856 → [−1.9189, 3.2522].
    assert a_fid["mean"] == pytest.approx(4 / 6, abs=1e-3)
    assert a_fid["ci_low"] == pytest.approx(-1.9189, abs=1e-3)
    assert a_fid["ci_high"] == pytest.approx(3.2522, abs=1e-3)
    # A features: case means 0.5, 2.0, 0.5 → mean 1.0; SS 0.25+1+0.25 = 1.5, var 0.75, sd 0.8660,
    # se 0.8660/√3 = 0.5 → half-width 4.3027·0.5 = 2.1513 → [−1.1513, 3.1513].
    a_feat = row(rows, method="A", question="features")
    assert (a_feat["mean"], a_feat["ci_low"], a_feat["ci_high"]) == pytest.approx((1.0, -1.1513, 3.1513), abs=1e-3)
    # B = A − 1: same spread, shifted means: fidelity −2/6 = −0.3333, features 0.0, artifacts 1.0 (sd 0 → [1, 1]).
    assert row(rows, method="B", question="fidelity")["mean"] == pytest.approx(-1 / 3, abs=1e-3)
    assert row(rows, method="B", question="features")["mean"] == pytest.approx(0.0, abs=1e-3)
    b_art = row(rows, method="B", question="artifacts")
    assert (b_art["mean"], b_art["ci_low"], b_art["ci_high"]) == (1.0, 1.0, 1.0)


def test_t_interval_with_one_case_is_undefined():
    recs = [r for r in known_records() if r["case"] == "c1"]
    a_fid = row(summarize(recs, ci="t"), method="A", question="fidelity")
    assert a_fid["mean"] == 1.5 and math.isnan(a_fid["ci_low"]) and math.isnan(a_fid["ci_high"])


def test_rows_sorted_by_method_then_numeric_factor():
    recs = [dict(r, factor=f) for f in ("64", "4", "16") for r in known_records() if r["method"] == "A"]
    assert [r["factor"] for r in summarize(recs, n_boot=10)][:: len(QUESTIONS)] == ["4", "16", "64"]


def test_bootstrap_degenerate_data_has_point_interval():
    recs = [dict(reader=r, case=c, method="A", factor="", fidelity=1, features=-2, artifacts=0)
            for r in ("r1", "r2", "r3") for c in ("c1", "c2", "c3", "c4")]
    for r, value in zip(summarize(recs), (1, -2, 0)):
        assert (r["mean"], r["ci_low"], r["ci_high"]) == (value, value, value)


def exact_bootstrap_interval(scores: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the exact two-way bootstrap distribution: every ordered resample of readers
    (2^2) and cases (3^3) is equally likely; a resample's statistic is the mean over its drawn cells with an
    answer (nan = missing), and resamples without any answer are dropped (the distribution is conditioned)."""
    n_readers, n_cases = scores.shape
    values = []
    for readers in itertools.product(range(n_readers), repeat=n_readers):
        for cases in itertools.product(range(n_cases), repeat=n_cases):
            cells = scores[np.ix_(readers, cases)]
            if not np.isnan(cells).all():
                values.append(np.nanmean(cells))
    values = np.sort(values)
    cdf = np.arange(1, len(values) + 1) / len(values)
    alpha = 1 - level
    return values[np.searchsorted(cdf, alpha / 2)], values[np.searchsorted(cdf, 1 - alpha / 2)]


@pytest.mark.parametrize("missing", [None, ("r2", "c3")], ids=["complete", "missing-cell"])
def test_bootstrap_matches_exact_enumeration(missing):
    recs = [r for r in known_records() if r["method"] == "A" and (r["reader"], r["case"]) != missing]
    scores = np.array([A_SCORES["fidelity"]["r1"], A_SCORES["fidelity"]["r2"]], dtype=float)
    if missing:
        scores[1, 2] = np.nan
    low, high = exact_bootstrap_interval(scores)
    a_fid = row(summarize(recs, n_boot=20000, seed=1), question="fidelity")
    assert a_fid["mean"] == pytest.approx(np.nanmean(scores))  # the plain mean of the answers
    assert a_fid["ci_low"] == pytest.approx(low, abs=0.05)
    assert a_fid["ci_high"] == pytest.approx(high, abs=0.05)


def test_bootstrap_is_deterministic_and_fast():
    rng = np.random.default_rng(0)
    recs = [dict(reader=f"r{r}", case=f"c{c}", method="A", factor="16",
                 **{q: int(rng.integers(-2, 3)) for q in QUESTIONS}) for r in range(3) for c in range(50)]
    start = time.perf_counter()
    first = summarize(recs, n_boot=2000, seed=7)
    assert time.perf_counter() - start < 1.0
    assert summarize(recs, n_boot=2000, seed=7) == first
    assert summarize(recs, n_boot=2000, seed=8) != first
    for r in first:
        assert r["mean"] == pytest.approx(np.mean([rec[r["question"]] for rec in recs]))
        assert r["ci_low"] < r["mean"] < r["ci_high"]


# ----------------------------------------------------------------------------------- paired difference


def test_paired_difference_constant_offset():
    rows = paired_difference(known_records(), "A", "B")
    assert [r["question"] for r in rows] == list(QUESTIONS)
    for r in rows:
        assert (r["a"], r["b"], r["factor"], r["n_pairs"]) == ("A", "B", "16", 6)
        assert (r["mean_diff"], r["ci_low"], r["ci_high"]) == (1.0, 1.0, 1.0)
    reverse = paired_difference(known_records(), "B", "A", factor="16")
    assert all(r["mean_diff"] == -1.0 for r in reverse)


def test_paired_difference_only_uses_shared_pairs_and_factors():
    recs = known_records()
    # B lost (r2, c3); A's fidelity there (−1) must not count: pairs (A − B) are all 1 anyway, so change A's
    # r1/c1 fidelity from 2 to 0 → differences over 5 pairs: −1, 1, 1, 1, 1 → mean 3/5.
    recs = [r for r in recs if (r["method"], r["reader"], r["case"]) != ("B", "r2", "c3")]
    next(r for r in recs if (r["method"], r["reader"], r["case"]) == ("A", "r1", "c1"))["fidelity"] = 0
    fid = row(paired_difference(recs, "A", "B", n_boot=200), question="fidelity")
    assert (fid["n_pairs"], fid["mean_diff"]) == (5, pytest.approx(0.6))
    # a method answered at factor "" only pairs with every factor of the other
    recs = known_records() + [dict(r, method="C", factor="") for r in known_records() if r["method"] == "B"]
    recs += [dict(r, factor="64") for r in known_records() if r["method"] == "A"]
    rows = paired_difference(recs, "A", "C", n_boot=50)
    assert sorted({r["factor"] for r in rows}) == ["16", "64"]
    assert all(r["mean_diff"] == 1.0 for r in rows)


def test_paired_difference_errors():
    with pytest.raises(AnalysisError, match="unknown method 'Z'"):
        paired_difference(known_records(), "A", "Z")
    disjoint = [dict(r, case=r["case"] + "b") if r["method"] == "B" else r for r in known_records()]
    with pytest.raises(AnalysisError, match="no \\(reader, case\\)"):
        paired_difference(disjoint, "A", "B")


# --------------------------------------------------------------------------------------------- agreement


def test_icc_shrout_fleiss_example():
    ratings = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]])
    assert round(icc_2_1(ratings), 2) == 0.29
    assert icc_2_1(ratings) == pytest.approx(0.2898, abs=1e-4)
    identical = np.repeat(np.array([[-2], [0], [1], [2]]), 3, axis=1)
    assert icc_2_1(identical) == pytest.approx(1.0)


def test_agreement_over_complete_items():
    recs = known_records()
    rows = agreement(recs)
    assert [(r["question"], r["n_items"], r["n_readers"]) for r in rows] == [(q, 6, 2) for q in QUESTIONS]
    # items (case, method) in sorted order; columns r1, r2 (fidelity from the table above, B = A − 1)
    fidelity = np.array([[2, 1], [1, 0], [1, 1], [0, 0], [0, -1], [-1, -2]])
    assert rows[0]["icc"] == pytest.approx(icc_2_1(fidelity))
    assert rows[2]["icc"] == pytest.approx(1.0)  # artifacts: r1 and r2 agree on every item (A: 2, B: 1)
    # a third reader who answered one item only leaves a single complete item → nan
    recs.append(dict(recs[0], reader="r3"))
    assert all(r["n_items"] == 1 and r["n_readers"] == 3 and math.isnan(r["icc"]) for r in agreement(recs))


# -------------------------------------------------------------------------------------------- validation


def test_validation_names_record_index():
    recs = known_records()
    recs[4] = dict(recs[4], fidelity=3)
    with pytest.raises(AnalysisError, match="record 4: score 'fidelity'=3"):
        summarize(recs)
    recs = known_records()
    del recs[2]["case"]
    with pytest.raises(AnalysisError, match="record 2: missing key\\(s\\) case"):
        summarize(recs)
    with pytest.raises(AnalysisError):
        summarize(known_records(), ci="normal")


# ---------------------------------------------------------------------------------------------- analyze


def test_analyze_writes_all_outputs(tmp_path):
    recs = known_records(extra=True)
    result = analyze(recs, tmp_path / "out", compare=("A", "B"))
    names = {p.name for p in result["paths"].values()}
    assert names == {"answers.csv", "summary.csv", "agreement.csv", "difference.csv", "summary.json",
                     "scores.png", "report.md"}
    assert all(p.parent == tmp_path / "out" and p.stat().st_size > 0 for p in result["paths"].values())
    assert (tmp_path / "out" / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "95% CI: two-way bootstrap over cases and readers, 2000 replicates, percentile" in report
    a_fid = row(result["summary"], method="A", question="fidelity")
    assert f"| A | 16 | 0.67 [{a_fid['ci_low']:.2f}, {a_fid['ci_high']:.2f}] | 1.00 [" in report
    assert "| B | 16 | -0.33 [" in report
    assert "| 16 | Image fidelity | 6 | 1.00 [1.00, 1.00] |" in report
    assert "| Image fidelity | " in report.split("Inter-reader agreement")[1]
    assert "![Mean score per question](scores.png)" in report

    # answers.csv round-trips the records (CSV cells are strings; the scores validate as such)
    with (tmp_path / "out" / "answers.csv").open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["reader", "case", "method", "factor", *QUESTIONS, "timestamp"]
        back = list(reader)
    assert back == [{k: str(v) for k, v in r.items()} for r in recs]
    assert summarize(back, n_boot=100) == summarize(recs, n_boot=100)

    summary = json.loads((tmp_path / "out" / "summary.json").read_text(), parse_constant=pytest.fail)
    assert summary["summary"] == result["summary"] and summary["difference"] == result["difference"]
    assert "two-way bootstrap" in summary["methods"]["ci"] and "ICC(2,1)" in summary["methods"]["agreement"]


def test_analyze_without_compare_and_empty(tmp_path):
    result = analyze(known_records(), tmp_path, n_boot=100, ci="t")
    assert "difference" not in result["paths"] and result["difference"] == []
    assert not (tmp_path / "difference.csv").exists()
    assert "t-interval" in (tmp_path / "report.md").read_text(encoding="utf-8")
    with pytest.raises(AnalysisError, match="no answers"):
        analyze([], tmp_path / "empty")
