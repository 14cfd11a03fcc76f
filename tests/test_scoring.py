"""ltengine/eval/scoring.py's study rules on crafted attention: which layer each rule calls lazier."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ltengine.eval.ruler_configs import parse_config
from ltengine.eval.scoring import layer_scores, row_peaks
from ltengine.lazy import distant_cover, distant_peak

T, D, P, SINK, WINDOW = 200, 8, 16, 4, 16
NEEDLES = (50, 80, 110, 140)  # distant keys for every probe row (positions 184..199)


def _keys() -> torch.Tensor:
    k = torch.zeros(1, T, D)
    for j, pos in enumerate(NEEDLES):
        k[0, pos, j] = 1.0
    return k


def _queries(rows: dict[int, int]) -> torch.Tensor:
    """One head, P probe rows: row r looks only at needle ``rows[r]``; the others attend uniformly."""
    q = torch.zeros(1, P, D)
    for r, j in rows.items():
        q[0, r, j] = 60.0
    return q


def _prefill(qs: list[torch.Tensor], k: torch.Tensor) -> SimpleNamespace:
    """What ``layer_scores`` reads of a SharedPrefill: one layer per query tensor, all on keys ``k``."""
    return SimpleNamespace(ids=list(range(T)), adapter=SimpleNamespace(scale=1.0),
                           q_tail=[q.transpose(0, 1) for q in qs], full=[SimpleNamespace(k=k.transpose(0, 1))] * len(qs))


def test_rowmax_keeps_a_head_that_retrieves_on_one_row():
    """peak averages a row's distant peak over the probe rows; rowmax takes the largest row. A head that
    reads the needle on one row only (the row naming its key) is lazier than a head that puts ~0.43 of
    every row on one distant key under peak, and less lazy under rowmax."""
    k = _keys()
    one_row = _queries({5: 0})
    every_row = torch.zeros(1, P, D)
    every_row[0, :, 1] = 5.0  # exp(5) / (exp(5) + 199) ~ 0.43 on needle 1, every row
    peaks = row_peaks(one_row, k, SINK, WINDOW, 1.0)
    assert peaks.shape == (1, P) and float(peaks[0, 5]) == pytest.approx(1.0, abs=1e-6)
    assert float(peaks[0, 0]) == pytest.approx(8 / 185, abs=1e-6)  # uniform: row 0 (position 184) sees 185 keys
    sp = _prefill([one_row, every_row], k)
    peak = [1 - float(distant_peak(q, k, SINK, WINDOW, 1.0).max()) for q in (one_row, every_row)]  # peak_score
    rowmax = layer_scores(sp, SINK, WINDOW, P, "rowmax")
    assert peak[0] > peak[1] and rowmax[0] < rowmax[1]
    assert rowmax[0] == pytest.approx(0.0, abs=1e-6)


def test_cover_prefers_a_head_reading_four_needles_over_one_read_four_times():
    """rowmax ties a head that reads four needles on four rows with one whose four rows read the same
    needle (both peak at 1.0); cover counts the distinct distant text read: 4 vs 1 (of 16)."""
    k = _keys()
    four = _queries({3: 0, 7: 1, 11: 2, 15: 3})
    same = _queries({3: 2, 7: 2, 11: 2, 15: 2})
    assert float(distant_cover(four, k, SINK, WINDOW, 1.0)[0]) == pytest.approx(4.0 + 12 / 185, abs=1e-3)
    assert float(distant_cover(same, k, SINK, WINDOW, 1.0)[0]) == pytest.approx(1.0 + 15 / 185, abs=1e-3)
    sp = _prefill([four, same], k)
    rowmax = layer_scores(sp, SINK, WINDOW, P, "rowmax")
    assert rowmax[0] == pytest.approx(rowmax[1], abs=1e-6)
    cover = layer_scores(sp, SINK, WINDOW, P, "cover")
    assert cover[0] < cover[1] and cover[1] == pytest.approx(1 - (1 + 15 / 185) / 16, abs=1e-4)
    with pytest.raises(ValueError, match="queries kept"):
        layer_scores(sp, SINK, WINDOW, P + 1, "cover")


def test_study_rule_config_names():
    c = parse_config("rowmax50")
    assert (c.policy, c.fraction, c.score, c.probe) == ("lighttransfer", 0.5, "rowmax", 64)
    assert parse_config("cover25-p16").probe == 16 and parse_config("cover50").score == "cover"
