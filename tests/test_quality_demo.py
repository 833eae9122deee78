"""The demo's report over seeds (alter.demo): mean ± std per method, and a plot whose
method names cannot print over each other."""
import numpy as np
import pytest

from alter import demo


def _rows(rng, methods):
    return [{"method": m, **{c: float(rng.uniform(0, 1)) for c in demo.COLUMNS[1:]}} for m in methods]


def test_mean_rows_against_numpy():
    rng = np.random.default_rng(5)
    methods = ["retain", "target", "alter", "npo"]
    per_seed = [_rows(rng, methods) for _ in range(5)]
    per_seed[3] = per_seed[3][::-1]  # methods are matched by name, not position
    rows = demo.mean_rows(per_seed)
    assert [r["method"] for r in rows] == methods and {r["seeds"] for r in rows} == {5}
    for row in rows:
        for column in demo.COLUMNS[1:]:
            values = [next(r for r in seed if r["method"] == row["method"])[column] for seed in per_seed]
            assert row[column] == pytest.approx(np.mean(values))
            assert row[column + "_std"] == pytest.approx(np.std(values))
    table = demo.format_table(rows)
    assert table.splitlines()[2].startswith("retain") and f"{rows[2]['forget_quality']:.3f} ± " in table


def test_plot_names_methods_in_a_legend(tmp_path, monkeypatch):
    """Labels next to points overlapped where two methods scored alike ("alter" and
    "retain" printed as "altetain"); the legend lists each method once instead."""
    import matplotlib.figure

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: figures.append(fig))
    rows = demo.mean_rows([_rows(np.random.default_rng(0), ["retain", "alter", "asym_lora"])] * 2)
    rows[1]["forget_quality"], rows[1]["model_utility"] = rows[0]["forget_quality"], rows[0]["model_utility"]
    demo.plot_tradeoff(rows, str(tmp_path / "tradeoff.png"))
    (ax,) = figures[0].axes
    assert not ax.texts
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["retain", "alter", "asym_lora"]
