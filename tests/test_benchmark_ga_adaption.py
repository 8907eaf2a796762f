"""What benchmarks/ga_adaption.py reports of its timed P=100 requests (paper_ga_summary)."""

from benchmarks.ga_adaption import paper_ga_summary


def _row(patience: int, precision: str, seconds: float, arch: str, evaluations: int = 900) -> dict:
    return {
        "search_workers": 2, "slices": 1, "path": "auto", "device": "cpu", "search_s": seconds,
        "evaluations": evaluations, "cache_hits": 100, "ms_per_evaluation": 50.0, "arch": arch,
        "loss": 2.2, "patience": patience, "precision": precision, "generations": 200 if not patience else 17,
    }  # fmt: skip


def test_each_patience_is_paired_with_its_own_bfloat16_run():
    # The seventh super-net's rows (docs/BENCHMARKS.md, "bfloat16 search"), one choice changed.
    rows = [
        _row(0, "float32", 60.94, "d2:a"),
        _row(0, "bfloat16", 49.51, "d2:a", 886),
        _row(10, "float32", 44.05, "d2:a"),
        _row(10, "bfloat16", 28.69, "d2:b", 604),
    ]
    summary = paper_ga_summary(rows)
    # The float32 figures are those of the rows without a precision (older runs) as before.
    assert summary["paper_ga_s"] == 60.94 and summary["paper_ga_patience_s"] == {"10": 44.05}
    assert summary["paper_ga_bfloat16_s"] == {"0": 49.51, "10": 28.69}
    assert summary["paper_ga_bfloat16_evaluations"] == {"0": 886, "10": 604}
    assert summary["paper_ga_bfloat16_speedup"] == {"0": 1.23, "10": 1.54}
    assert summary["paper_ga_bfloat16_same_choice"] == {"0": True, "10": False}
    older = [{k: v for k, v in row.items() if k != "precision"} for row in rows[::2]]
    assert paper_ga_summary(older) == {key: summary[key] for key in summary if "bfloat16" not in key}
