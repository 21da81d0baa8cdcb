"""Statistics and reports for the reader study (paper Figures 3 and 5).

Input: one dict per answer with ``reader``, ``case`` (the original image's id), ``method``, ``factor`` (downsizing
factor as a string, ``""`` when unknown) and one int score in −2..2 per question of ``QUESTIONS``.

* ``summarize``: mean score per (method, factor, question) with a 95% CI, by default a two-way nonparametric
  bootstrap over cases and readers (percentile interval); optionally a t-interval over case means.
* ``paired_difference``: mean of score(a) − score(b) over the (reader, case) pairs answered for both methods,
  with the same two-way bootstrap CI.
* ``icc_2_1`` / ``agreement``: inter-reader agreement, ICC(2,1) of Shrout & Fleiss (1979).
* ``bar_chart`` / ``analyze``: the figure, CSV / JSON tables and a Markdown report.

Only numpy and the standard library are imported here; matplotlib is imported lazily by ``bar_chart``, scipy by
``t_quantile``.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medlatent.evaluation.report import markdown_table
from medlatent.optional import import_optional
from medlatent.readerstudy.questions import QUESTIONS, SCORES, SHORT

CORE = ("reader", "case", "method", "factor")
CI_METHODS = ("bootstrap", "t")
AGREEMENT_METHOD = (
    "ICC(2,1) (Shrout & Fleiss 1979: two-way random effects, absolute agreement, single rater) across readers, "
    "over the items (case, method, factor) answered by every reader"
)


class AnalysisError(ValueError):
    """Invalid reader-study answers or analysis request."""


@dataclass(frozen=True)
class _Answer:
    reader: str
    case: str
    method: str
    factor: str
    scores: tuple[int, ...]  # in QUESTIONS order


# --------------------------------------------------------------------------------------------- validation


def _score(value: Any) -> int | None:
    """The value as an int, or None; accepts ints and integral strings/floats so CSV read-backs validate."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _validate(records: Iterable[Mapping[str, Any]]) -> list[_Answer]:
    """Check every record; errors name the record index and the problem."""
    answers = []
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise AnalysisError(f"record {i}: expected a dict, got {type(rec).__name__}")
        missing = [k for k in (*CORE, *QUESTIONS) if k not in rec]
        if missing:
            raise AnalysisError(f"record {i}: missing key(s) {', '.join(missing)}")
        for k in ("reader", "case", "method"):
            if rec[k] is None or str(rec[k]) == "":
                raise AnalysisError(f"record {i}: empty {k!r}")
        scores = []
        for q in QUESTIONS:
            s = _score(rec[q])
            if s is None or s not in SCORES:
                raise AnalysisError(f"record {i}: score {q!r}={rec[q]!r} is not an integer in "
                                    f"{SCORES[0]}..{SCORES[-1]}")
            scores.append(s)
        factor = "" if rec["factor"] is None else str(rec["factor"])
        answers.append(_Answer(str(rec["reader"]), str(rec["case"]), str(rec["method"]), factor, tuple(scores)))
    return answers


def _factor_key(factor: str) -> tuple[int, float, str]:
    """Numeric factors first, in numeric order ("4" < "16" < "64"), then the others alphabetically."""
    try:
        return (0, float(factor), factor)
    except ValueError:
        return (1, 0.0, factor)


def _check_level(level: float, n_boot: int) -> None:
    if not 0 < level < 1:
        raise AnalysisError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise AnalysisError(f"n_boot must be >= 1, got {n_boot}")


# ---------------------------------------------------------------------------------- Student t quantile


def t_quantile(p: float, df: float) -> float:
    """Student t quantile t(p, df) (``scipy.stats.t``, from the ``app`` extra; imported only for ``--ci t``)."""
    if not 0 < p < 1 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    stats = import_optional("scipy.stats", "the reader study's t-interval", "pip install 'medlatent[app]'")
    return float(stats.t.ppf(p, df))


# ------------------------------------------------------------------------------------- interval methods


def bootstrap_ci(sums: np.ndarray, counts: np.ndarray, *, n_boot: int, seed: int, level: float) -> tuple[float, float]:
    """Two-way nonparametric bootstrap percentile interval of the mean answer.

    ``sums`` / ``counts``: reader×case matrices of the sum and number of answers per cell (0 where unanswered).
    Each replicate resamples readers and, independently, cases with replacement; a cell drawn k times (reader
    count × case count) counts k times, so the replicate mean is Σ w·sums / Σ w·counts with w the outer product
    of the counts. Replicates that draw no answered cell are skipped. Returns (nan, nan) if all are.
    """
    rng = np.random.default_rng(seed)
    n_readers, n_cases = counts.shape
    reader_w = rng.multinomial(n_readers, np.full(n_readers, 1.0 / n_readers), size=n_boot).astype(float)
    case_w = rng.multinomial(n_cases, np.full(n_cases, 1.0 / n_cases), size=n_boot).astype(float)
    num = ((reader_w @ sums) * case_w).sum(axis=1)
    den = ((reader_w @ counts) * case_w).sum(axis=1)
    ok = den > 0
    if not ok.any():
        return math.nan, math.nan
    alpha = 1.0 - level
    low, high = np.percentile(num[ok] / den[ok], [50.0 * alpha, 100.0 * (1.0 - alpha / 2)])
    return float(low), float(high)


def t_interval(case_means: np.ndarray, *, level: float) -> tuple[float, float, float]:
    """(mean, low, high): mean ± t(1−α/2, n−1)·sd/√n over the n case means; (mean, nan, nan) when n < 2."""
    n = len(case_means)
    mean = float(np.mean(case_means))
    if n < 2:
        return mean, math.nan, math.nan
    half = t_quantile(1.0 - (1.0 - level) / 2, n - 1) * float(np.std(case_means, ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half


def _ci_description(ci: str, n_boot: int, level: float) -> str:
    pct = f"{100 * level:g}%"
    if ci == "bootstrap":
        return f"{pct} CI: two-way bootstrap over cases and readers, {n_boot} replicates, percentile"
    return f"{pct} CI: t-interval over cases (answers averaged over readers per case), df = cases − 1"


# ------------------------------------------------------------------------------------------ cell matrices


def _cells(answers: Iterable[_Answer], item: Callable[[_Answer], Any] = lambda a: a.case) -> dict[tuple, tuple]:
    """(reader, item) → (per-question score sums, number of answers); a reader may answer an item twice."""
    cells: dict[tuple, tuple] = {}
    for a in answers:
        key = (a.reader, item(a))
        s, n = cells.get(key, (np.zeros(len(QUESTIONS)), 0))
        cells[key] = (s + a.scores, n + 1)
    return cells


def _matrices(cells: Mapping[tuple[str, str], tuple[np.ndarray, float]]) -> tuple[np.ndarray, np.ndarray]:
    """question×reader×case sums and reader×case counts of a cell map."""
    readers = sorted({r for r, _ in cells})
    cases = sorted({c for _, c in cells})
    ri = {r: i for i, r in enumerate(readers)}
    ci = {c: i for i, c in enumerate(cases)}
    sums = np.zeros((len(QUESTIONS), len(readers), len(cases)))
    counts = np.zeros((len(readers), len(cases)))
    for (r, c), (s, n) in cells.items():
        sums[:, ri[r], ci[c]] = s
        counts[ri[r], ci[c]] = n
    return sums, counts


def _groups(answers: Iterable[_Answer]) -> dict[tuple[str, str], list[_Answer]]:
    groups: dict[tuple[str, str], list[_Answer]] = {}
    for a in answers:
        groups.setdefault((a.method, a.factor), []).append(a)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][0], _factor_key(kv[0][1]))))


# ---------------------------------------------------------------------------------------------- summary


def summarize(
    records: Sequence[Mapping[str, Any]],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    ci: str = "bootstrap",
) -> list[dict[str, Any]]:
    """Mean score and CI per (method, factor, question), sorted by method, factor (numeric), question.

    ``ci="bootstrap"``: ``mean`` is the plain mean of the answers; the interval is the two-way (cases × readers)
    bootstrap percentile interval (see ``bootstrap_ci``). ``ci="t"``: each case is averaged over its readers and
    ``mean`` ± t(1−α/2, n−1)·sd/√n is taken over the n case means (equal to the plain mean when every reader
    answered every case); (nan, nan) with a single case.
    """
    if ci not in CI_METHODS:
        raise AnalysisError(f"ci must be one of {CI_METHODS}, got {ci!r}")
    _check_level(level, n_boot)
    rows = []
    for (method, factor), answers in _groups(_validate(records)).items():
        sums, counts = _matrices(_cells(answers))
        n_readers, n_cases = counts.shape
        for qi, question in enumerate(QUESTIONS):
            if ci == "bootstrap":
                mean = float(sums[qi].sum() / counts.sum())
                low, high = bootstrap_ci(sums[qi], counts, n_boot=n_boot, seed=seed, level=level)
            else:
                mean, low, high = t_interval(sums[qi].sum(axis=0) / counts.sum(axis=0), level=level)
            rows.append(dict(method=method, factor=factor, question=question, n_answers=len(answers),
                             n_cases=n_cases, n_readers=n_readers, mean=mean, ci_low=low, ci_high=high, ci_method=ci))
    return rows


# ------------------------------------------------------------------------------------- paired difference


def _factor_pairs(fa: set[str], fb: set[str], factor: str | None, a: str, b: str) -> list[tuple[str, str, str]]:
    """(label, factor of a, factor of b) to compare; a method whose only factor is "" pairs with any factor."""

    def wildcard(fs: set[str]) -> bool:
        return fs == {""}

    if factor is not None:
        factor = str(factor)
        picked = [factor if factor in fs else ("" if wildcard(fs) else None) for fs in (fa, fb)]
        for m, p, fs in zip((a, b), picked, (fa, fb)):
            if p is None:
                raise AnalysisError(f"method {m!r} has no answers at factor {factor!r} (factors: {sorted(fs)})")
        return [(factor, picked[0], picked[1])]
    if wildcard(fa):
        return [(f, "", f) for f in sorted(fb, key=_factor_key)]
    if wildcard(fb):
        return [(f, f, "") for f in sorted(fa, key=_factor_key)]
    shared = fa & fb
    if not shared:
        raise AnalysisError(f"methods {a!r} {sorted(fa)} and {b!r} {sorted(fb)} share no factor; pass factor=")
    return [(f, f, f) for f in sorted(shared, key=_factor_key)]


def paired_difference(
    records: Sequence[Mapping[str, Any]],
    a: str,
    b: str,
    *,
    factor: str | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> list[dict[str, Any]]:
    """Paired mean difference score(a) − score(b) per question (and per shared factor).

    Pairs are the (reader, case) cells answered for both methods (a cell's repeated answers are averaged first).
    The CI is the two-way bootstrap percentile interval over cases and readers of the difference matrix. With
    ``factor=None`` each factor the methods share is compared; a method with the single factor "" pairs with
    every factor of the other.
    """
    _check_level(level, n_boot)
    answers = _validate(records)
    factors: dict[str, set[str]] = {}
    for ans in answers:
        factors.setdefault(ans.method, set()).add(ans.factor)
    for m in (a, b):
        if m not in factors:
            raise AnalysisError(f"unknown method {m!r}; known: {', '.join(sorted(factors))}")
    groups = _groups(answers)
    rows = []
    for label, fa, fb in _factor_pairs(factors[a], factors[b], factor, a, b):
        cells_a, cells_b = _cells(groups[(a, fa)]), _cells(groups[(b, fb)])
        diff = {k: (cells_a[k][0] / cells_a[k][1] - cells_b[k][0] / cells_b[k][1], 1.0)
                for k in cells_a.keys() & cells_b.keys()}
        if not diff:
            continue
        sums, counts = _matrices(diff)
        for qi, question in enumerate(QUESTIONS):
            low, high = bootstrap_ci(sums[qi], counts, n_boot=n_boot, seed=seed, level=level)
            rows.append(dict(a=a, b=b, factor=label, question=question, n_pairs=len(diff),
                             mean_diff=float(sums[qi].sum() / counts.sum()), ci_low=low, ci_high=high))
    if not rows:
        raise AnalysisError(f"no (reader, case) was answered for both {a!r} and {b!r}")
    return rows


# -------------------------------------------------------------------------------------------- agreement


def icc_2_1(matrix: np.ndarray) -> float:
    """ICC(2,1) of Shrout & Fleiss (1979): two-way random effects, absolute agreement, single rater.

    ``matrix``: items × raters, no missing values. From the two-way ANOVA mean squares (rows R, columns C,
    error E): (MSR − MSE) / (MSR + (k−1)·MSE + k·(MSC − MSE)/n). nan when undefined (no variance at all).
    """
    x = np.asarray(matrix, dtype=float)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 2:
        raise AnalysisError(f"icc_2_1 needs an items×raters matrix with at least 2 of each, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise AnalysisError("icc_2_1 needs a matrix without missing values")
    n, k = x.shape
    grand = x.mean()
    ss_rows = k * ((x.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((x.mean(axis=0) - grand) ** 2).sum()
    ss_err = ((x - grand) ** 2).sum() - ss_rows - ss_cols
    ms_rows, ms_cols, ms_err = ss_rows / (n - 1), ss_cols / (k - 1), ss_err / ((n - 1) * (k - 1))
    denom = ms_rows + (k - 1) * ms_err + k * (ms_cols - ms_err) / n
    return float((ms_rows - ms_err) / denom) if denom > 0 else math.nan


def agreement(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """ICC(2,1) per question across all readers, over the items (case, method, factor) every reader answered.

    Items some reader did not answer are dropped (a repeated answer is averaged); nan with fewer than 2 readers
    or 2 complete items.
    """
    answers = _validate(records)
    readers = sorted({a.reader for a in answers})
    cells = _cells(answers, item=lambda a: (a.case, a.method, a.factor))
    items = sorted({item for _, item in cells})
    complete = [it for it in items if all((r, it) in cells for r in readers)]
    rows = []
    for qi, question in enumerate(QUESTIONS):
        icc = math.nan
        if len(readers) >= 2 and len(complete) >= 2:
            matrix = [[cells[(r, it)][0][qi] / cells[(r, it)][1] for r in readers] for it in complete]
            icc = icc_2_1(np.array(matrix))
        rows.append(dict(question=question, icc=icc, n_items=len(complete), n_readers=len(readers)))
    return rows


# ---------------------------------------------------------------------------------------------- outputs


def _bar_label(method: str, factor: str) -> str:
    return f"{method} f={factor}" if factor else method


def bar_chart(summary_rows: Sequence[Mapping[str, Any]], path: str | Path, *, title: str | None = None) -> Path:
    """Grouped bar chart (paper Figure 3): one group per question, one bar per (method, factor), CI error bars.

    Drawn on an off-screen Agg figure (no pyplot, so no global backend is set); PNG at 150 dpi.
    """
    from matplotlib.figure import Figure

    series = list(dict.fromkeys((r["method"], r["factor"]) for r in summary_rows))
    questions = [q for q in QUESTIONS if any(r["question"] == q for r in summary_rows)]
    by_key = {(r["method"], r["factor"], r["question"]): r for r in summary_rows}
    fig = Figure(figsize=(max(6.0, 1.2 + 0.35 * len(series) * len(questions)), 4.5))
    ax = fig.add_subplot()
    width = 0.8 / max(len(series), 1)
    for si, (method, factor) in enumerate(series):
        rows = [by_key.get((method, factor, q)) for q in questions]
        means = np.array([r["mean"] if r else np.nan for r in rows], dtype=float)
        low = np.array([r["ci_low"] if r else np.nan for r in rows], dtype=float)
        high = np.array([r["ci_high"] if r else np.nan for r in rows], dtype=float)
        yerr = np.nan_to_num(np.vstack([means - low, high - means]))  # no bar for an undefined interval
        x = np.arange(len(questions)) - 0.4 + width * (si + 0.5)
        ax.bar(x, means, width, yerr=yerr, capsize=3, label=_bar_label(method, factor))
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(questions)), [SHORT[q] for q in questions])
    ax.set_ylim(SCORES[0] - 0.1, SCORES[-1] + 0.1)  # the score range, with room for error-bar caps at ±2
    ax.set_yticks(SCORES)
    ax.set_ylabel("Mean score")
    if title:
        ax.set_title(title)
    # below the axes, so it never hides a bar
    ax.legend(fontsize="small", ncols=min(len(series), 4) or 1, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    path = Path(path)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_answers_csv(records: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """The raw answers: reader, case, method, factor, the questions, then any extra keys (e.g. timestamps)."""
    _validate(records)
    columns = [*CORE, *QUESTIONS]
    for rec in records:
        columns += [k for k in rec if k not in columns]
    return _write_csv(Path(path), columns, records)


def _fmt(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.2f}"


def _fmt_ci(mean: float, low: float, high: float) -> str:
    return f"{_fmt(mean)} [{_fmt(low)}, {_fmt(high)}]"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Rows of preformatted cells as Markdown table lines (the evaluation reports' table writer)."""
    return markdown_table([dict(zip(header, r)) for r in rows], columns=header).splitlines()


def _report(answers: list[_Answer], summary: list[dict], difference: list[dict], agree: list[dict],
            descriptions: dict[str, str], png: str) -> str:
    lines = ["# Reader study", "",
             f"{len(answers)} answers by {len({a.reader for a in answers})} readers on "
             f"{len({a.case for a in answers})} cases; each pair (original left, reconstruction right) scored on a "
             f"5-point Likert scale from {SCORES[0]} to {SCORES[-1]}. Mean score per method and downsizing factor; "
             f"{descriptions['ci']}.", "", "## Scores", ""]
    by_key = {(r["method"], r["factor"], r["question"]): r for r in summary}
    series = list(dict.fromkeys((r["method"], r["factor"]) for r in summary))
    first = {s: by_key[(*s, QUESTIONS[0])] for s in series}
    lines += _table(["Method", "Factor", *(SHORT[q] for q in QUESTIONS), "Cases", "Readers"],
                    [[m, f or "–", *(_fmt_ci(by_key[(m, f, q)]["mean"], by_key[(m, f, q)]["ci_low"],
                                             by_key[(m, f, q)]["ci_high"]) for q in QUESTIONS),
                      str(first[(m, f)]["n_cases"]), str(first[(m, f)]["n_readers"])] for m, f in series])
    if difference:
        a, b = difference[0]["a"], difference[0]["b"]
        lines += ["", f"## Paired difference ({a} − {b})", "", descriptions["difference"] + ".", ""]
        lines += _table(["Factor", "Question", "Pairs", "Mean difference [CI]"],
                        [[r["factor"] or "–", SHORT[r["question"]], str(r["n_pairs"]),
                          _fmt_ci(r["mean_diff"], r["ci_low"], r["ci_high"])] for r in difference])
    lines += ["", "## Inter-reader agreement", "", descriptions["agreement"] + ".", ""]
    lines += _table(["Question", "ICC(2,1)", "Items", "Readers"],
                    [[SHORT[r["question"]], _fmt(r["icc"]), str(r["n_items"]), str(r["n_readers"])] for r in agree])
    lines += ["", f"![Mean score per question]({png})", ""]
    return "\n".join(lines)


def _jsonable(x: Any) -> Any:
    """nan → null, so summary.json is strict JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def analyze(
    records: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    *,
    compare: tuple[str, str] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    ci: str = "bootstrap",
) -> dict[str, Any]:
    """Full analysis into ``out_dir``: answers.csv, summary.csv, agreement.csv, difference.csv (with ``compare``),
    summary.json, scores.png and report.md. Returns ``{"paths": {name: Path}, "summary", "agreement",
    "difference"}`` (rows as from the functions above; ``difference`` is [] without ``compare``)."""
    answers = _validate(records)
    if not answers:
        raise AnalysisError("no answers to analyze")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    level = 0.95
    summary = summarize(records, n_boot=n_boot, seed=seed, level=level, ci=ci)
    agree = agreement(records)
    difference = paired_difference(records, *compare, n_boot=n_boot, seed=seed, level=level) if compare else []
    descriptions = {
        "ci": _ci_description(ci, n_boot, level),
        "difference": "Paired difference over the (reader, case) pairs answered for both methods; "
                      + _ci_description("bootstrap", n_boot, level),
        "agreement": AGREEMENT_METHOD,
    }
    paths = {
        "answers": write_answers_csv(records, out / "answers.csv"),
        "summary": _write_csv(out / "summary.csv", list(summary[0]), summary),
        "agreement": _write_csv(out / "agreement.csv", list(agree[0]), agree),
    }
    if difference:
        paths["difference"] = _write_csv(out / "difference.csv", list(difference[0]), difference)
    paths["json"] = out / "summary.json"
    paths["json"].write_text(json.dumps(_jsonable({
        "n_answers": len(answers), "readers": sorted({a.reader for a in answers}),
        "cases": sorted({a.case for a in answers}), "questions": list(QUESTIONS),
        "ci": ci, "level": level, "n_boot": n_boot, "seed": seed, "compare": list(compare) if compare else None,
        "methods": descriptions, "summary": summary, "difference": difference, "agreement": agree,
    }), indent=2), encoding="utf-8")
    paths["figure"] = bar_chart(summary, out / "scores.png", title="Reader study: mean score (95% CI)")
    paths["report"] = out / "report.md"
    paths["report"].write_text(_report(answers, summary, difference, agree, descriptions, "scores.png"),
                               encoding="utf-8")
    return {"paths": paths, "summary": summary, "agreement": agree, "difference": difference}
