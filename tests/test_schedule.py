"""The mixture schedule: every curve, both units, normalised weights, phases."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from chatflow.schedule import Schedule
from chatflow.spec import parse_run
from factories import run_document

NAMES = ("en-web", "zh-web", "zh-en", "sft")


def schedule_of(schedule: dict, **training) -> Schedule:
    spec = run_document(schedule=schedule)
    spec["spec"]["training"].update(training)
    return Schedule.from_spec(parse_run(spec).spec)


def linear(curve: str = "linear", **extra) -> dict:
    return {
        "curve": curve,
        "growth": 1000,
        "start": {"en-web": 5, "zh-web": 2, "zh-en": 3},  # normalised to 0.5, 0.2, 0.3
        "end": {"en-web": 0.1, "zh-web": 0.3, "zh-en": 0.1, "sft": 0.5},
        **extra,
    }


def test_linear_ramps_from_start_to_end_then_holds() -> None:
    s = schedule_of(linear())
    np.testing.assert_allclose(s.weights_at(0), [0.5, 0.2, 0.3, 0.0])
    np.testing.assert_allclose(s.weights_at(500), [0.3, 0.25, 0.2, 0.25])
    np.testing.assert_allclose(s.weights_at([1000, 10**9]), [[0.1, 0.3, 0.1, 0.5]] * 2)
    assert s.phase_at(999) == (0, "growth") and s.phase_at(1000) == (1, "final")
    np.testing.assert_allclose(s.fraction_done([0, 250, 5000]), [0, 0.25, 1])


def test_cosine_eases_and_meets_linear_at_the_ends_and_middle() -> None:
    cosine, lin = schedule_of(linear("cosine")), schedule_of(linear())
    for x in (0, 500, 1000, 2000):
        np.testing.assert_allclose(cosine.weights_at(x), lin.weights_at(x), atol=1e-12)
    # eases in: at a quarter of the way, cosine has moved less than linear
    assert abs(cosine.weights_at(250)[3]) < lin.weights_at(250)[3]


def test_tokens_unit_counts_seq_length_per_sample() -> None:
    s = schedule_of(linear(unit="tokens", growth=64_000), seqLength=64)
    np.testing.assert_allclose(s.weights_at(s.progress(500)), s.weights_at(32_000))
    np.testing.assert_allclose(s.weights_at(s.progress(1000)), [0.1, 0.3, 0.1, 0.5])


def test_stages_hold_each_mixture_until_its_end() -> None:
    s = schedule_of(
        {
            "curve": "stages",
            "stages": [
                {"name": "warm", "until": 100, "weights": {"en-web": 1}},
                {"until": 300, "weights": {"en-web": 1, "zh-web": 1}},
                {"name": "sft", "weights": {"sft": 1}},
            ],
        }
    )
    np.testing.assert_allclose(s.weights_at([0, 99]), [[1, 0, 0, 0]] * 2)
    np.testing.assert_allclose(s.weights_at([100, 299]), [[0.5, 0.5, 0, 0]] * 2)
    np.testing.assert_allclose(s.weights_at([300, 10**7]), [[0, 0, 0, 1]] * 2)
    assert [s.phase_at(x)[1] for x in (0, 150, 300)] == ["warm", "stage-1", "sft"]
    assert s.horizon == 300


def test_points_interpolate_piecewise_linearly() -> None:
    s = schedule_of(
        {
            "curve": "points",
            "points": [
                {"at": 100, "weights": {"en-web": 1}},
                {"at": 200, "weights": {"zh-web": 1}},
                {"at": 400, "weights": {"sft": 1}},
            ],
        }
    )
    np.testing.assert_allclose(s.weights_at(0), [1, 0, 0, 0])  # before the first point
    np.testing.assert_allclose(s.weights_at(150), [0.5, 0.5, 0, 0])
    np.testing.assert_allclose(s.weights_at(300), [0, 0.5, 0, 0.5])
    np.testing.assert_allclose(s.weights_at(1000), [0, 0, 0, 1])


weights = st.dictionaries(st.sampled_from(NAMES), st.floats(0.01, 10), min_size=1)


@given(
    curve=st.sampled_from(["linear", "cosine", "points"]),
    start=weights,
    end=weights,
    x=st.lists(st.floats(0, 1e7), min_size=1, max_size=20),
)
def test_weights_are_a_distribution_everywhere(curve, start, end, x) -> None:
    spec = (
        {"curve": curve, "growth": 5_000_000, "start": start, "end": end}
        if curve != "points"
        else {
            "curve": "points",
            "points": [{"at": 0, "weights": start}, {"at": 10, "weights": end}],
        }
    )
    w = schedule_of(spec).weights_at(np.array(x))
    assert w.shape == (len(x), 4)
    assert (w >= 0).all()
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
