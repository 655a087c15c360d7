"""Reports stay bounded for any number of classes: the confusion matrix's PNG and the table
`mae-cli evaluate` prints (the full matrix stays in the results as numbers)."""

import io
import time

import numpy as np
import pytest
from PIL import Image

from pipeline import reports
from pipeline.stages.evaluate import format_result


def _result(n: int, seed: int = 0, mistaken: int = 0) -> dict:
    """A synthetic result; with `mistaken`, class 7 is taken that often for class 3."""
    rng = np.random.default_rng(seed)
    confusion = rng.poisson(0.02, (n, n)) + np.diag(rng.integers(5, 20, n))
    confusion[7, 3] += mistaken
    classes = [f"class {i} (a long name, [x])" for i in range(n)]
    per_class = confusion.diagonal() / confusion.sum(1)
    return {
        "stage": "finetune", "run_id": "r", "top1": 0.5, "top5": 0.9, "count": int(confusion.sum()),
        "classes": classes, "per_class": dict(zip(classes, per_class.tolist(), strict=True)),
        "confusion": confusion.tolist(),
    }  # fmt: skip


@pytest.mark.parametrize("n", [10, 31, 1_200, 2_500])
def test_the_confusion_png_has_a_bounded_size_for_any_class_count(n):
    """A 1,000-class matrix drawn cell by cell was ~60,000 px a side; above ~1,090 classes
    matplotlib raised."""
    r = _result(n)
    start = time.perf_counter()
    png = reports.confusion_png(r["confusion"], r["classes"], "t")
    assert time.perf_counter() - start < 30
    width, height = Image.open(io.BytesIO(png)).size
    assert max(width, height) <= (1 + 0.6 * 30) * 100 and len(png) < 2_000_000


def test_the_printed_table_of_many_classes_names_the_worst_and_the_most_confused():
    r = _result(1_200, mistaken=500)
    text = format_result(r)
    assert len(text.splitlines()) < 60
    mistakes = r["confusion"][7][3]  # 500, and any noise
    assert f"class 7 (a long name, [x]) -> class 3 (a long name, [x]): {mistakes}" in text
    least = text.split("least accurate:\n")[1].splitlines()[0]
    assert least.endswith("class 7 (a long name, [x])")
    small = format_result(_result(10))
    assert "confusion matrix (rows: true class" in small and len(small.splitlines()) == 25
