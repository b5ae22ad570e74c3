"""The pure parts of the answer path: which search results are kept, and how answers are written."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from service.pipeline import _kept, render


@pytest.mark.parametrize("widest", [0, 3, 32, 33, 200])
def test_kept_drops_padding_and_each_rows_own_exclusions(widest: int) -> None:
    rng = np.random.default_rng(widest)
    fids = rng.integers(0, 300, (6, 120))
    fids[:, -7:] = -1  # padding where the index had fewer results
    excludes = [np.unique(rng.integers(0, 300, rng.integers(0, widest + 1))) for _ in range(6)]
    if widest:
        excludes[0] = np.unique(rng.integers(0, 300, widest * 3))[:widest]  # one row at the full width
    got = _kept(fids, excludes)
    want = np.array([[f >= 0 and f not in set(e.tolist()) for f in row] for row, e in zip(fids, excludes, strict=True)])
    np.testing.assert_array_equal(got, want)


def test_render_writes_valid_json_with_the_catalogues_id_type_and_six_decimals() -> None:
    b = SimpleNamespace(model_version="m1", index_version="i1", versions_json='"model_version":"m1","index_version":"i1"}')
    doc = json.loads(render([7, 11], np.array([0.5, -0.1234567], dtype=np.float32), b))  # type: ignore[arg-type]
    assert doc == {"items": [{"item_id": 7, "score": 0.5}, {"item_id": 11, "score": -0.123457}],
                   "model_version": "m1", "index_version": "i1"}
    tricky = ['quote"', "back\\slash", "nl\nx", "ünï"]
    doc = json.loads(render(tricky, [1.0, 0.9, 0.8, 0.7], b, fallback=True, warnings=["w"]))  # type: ignore[arg-type]
    assert [i["item_id"] for i in doc["items"]] == tricky
    assert doc["fallback"] == "popular" and doc["warnings"] == ["w"]
    assert json.loads(render([], [], b))["items"] == []  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-finite"):
        render([1], [float("nan")], b)  # type: ignore[arg-type]
