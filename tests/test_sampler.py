"""The dynamic sampler: deterministic, shardable, on target, and exactly resumable."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from chatflow.sampler import MixtureSampler, Position
from chatflow.schedule import Schedule
from chatflow.spec import parse_run
from factories import run_document

NAMES = ("en-web", "zh-web", "zh-en", "sft")
weights = st.dictionaries(st.sampled_from(NAMES), st.floats(0.0, 1.0), min_size=1).filter(
    lambda w: sum(w.values()) > 0.05
)


def sampler_of(schedule: dict | None = None, seed: int = 0) -> MixtureSampler:
    document = run_document(schedule=schedule) if schedule else run_document()
    return MixtureSampler(Schedule.from_spec(parse_run(document).spec), seed)


def consumed(sampler: MixtureSampler, position: Position, count: int, consumers: int):
    """What `consumers` ranks x workers read of the next `count` samples, merged by index."""
    taken = []
    for c in range(consumers):
        share = -(-(count - c) // consumers)  # ceil: consumer c's indices below the end
        taken += itertools.islice(sampler.stream(position, c, consumers), share)
    return sorted(taken)


def test_same_seed_same_sequence_other_seed_other_sequence() -> None:
    a, b = sampler_of(seed=7).sources_of(0, 5000), sampler_of(seed=7).sources_of(0, 5000)
    np.testing.assert_array_equal(a, b)
    assert (sampler_of(seed=8).sources_of(0, 5000) != a).any()


def test_any_slice_equals_the_whole_sequence() -> None:
    sampler = sampler_of()
    whole = sampler.sources_of(0, 10_000)
    np.testing.assert_array_equal(sampler.sources_of(1234, 777), whole[1234:2011])


@settings(max_examples=25, deadline=None)
@given(world=st.integers(1, 8), workers=st.integers(1, 4), count=st.integers(1, 3000))
def test_ranks_and_workers_cover_the_sequence_exactly_once(world, workers, count) -> None:
    sampler = sampler_of()
    plan, _ = sampler.plan(Position.start(4), count)
    expected = list(
        zip(plan.indices.tolist(), plan.sources.tolist(), plan.ordinals.tolist(), strict=False)
    )
    assert consumed(sampler, Position.start(4), count, world * workers) == expected


@settings(max_examples=20, deadline=None)
@given(
    curve=st.sampled_from(["linear", "cosine", "points", "stages"]),
    start=weights,
    end=weights,
    growth=st.integers(1, 200_000),
    seed=st.integers(0, 2**32),
)
def test_realised_fractions_track_the_target_in_every_10k_window(
    curve, start, end, growth, seed
) -> None:
    schedule = {
        "linear": {"curve": "linear", "growth": growth, "start": start, "end": end},
        "cosine": {"curve": "cosine", "growth": growth, "start": start, "end": end},
        "points": {
            "curve": "points",
            "points": [{"at": 0, "weights": start}, {"at": growth, "weights": end}],
        },
        "stages": {
            "curve": "stages",
            "stages": [{"until": growth, "weights": start}, {"weights": end}],
        },
    }[curve]
    sampler = sampler_of(schedule, seed)
    total, window = 150_000, 10_000
    sources = sampler.sources_of(0, total)
    onehot = np.eye(4)[sources]
    realised = np.vstack([np.zeros(4), np.cumsum(onehot, axis=0)])
    target = np.vstack(
        [np.zeros(4), np.cumsum(sampler.schedule.weights_at(np.arange(total)), axis=0)]
    )
    starts = np.arange(0, total - window + 1, 250)
    error = np.abs(
        (realised[starts + window] - realised[starts]) - (target[starts + window] - target[starts])
    )
    assert error.max() / window <= 0.01


@settings(max_examples=25, deadline=None)
@given(
    stop=st.integers(0, 5000),
    before=st.tuples(st.integers(1, 4), st.integers(1, 3)),
    after=st.tuples(st.integers(1, 4), st.integers(1, 3)),
)
def test_resume_with_other_world_size_continues_the_same_sequence(stop, before, after) -> None:
    """Stop at any n, resume with other ranks x workers: nothing lost, nothing repeated."""
    sampler, total = sampler_of(), 6000
    uninterrupted = consumed(sampler, Position.start(4), total, 1)
    first = consumed(sampler, Position.start(4), stop, before[0] * before[1])
    saved = Position.from_dict(sampler.advance(Position.start(4), stop).to_dict(NAMES), NAMES)
    rest = consumed(sampler, saved, total - stop, after[0] * after[1])
    assert first + rest == uninterrupted


def test_world_size_2_to_3() -> None:
    sampler = sampler_of()
    uninterrupted = consumed(sampler, Position.start(4), 9000, 1)
    first = consumed(sampler, Position.start(4), 4096, 2)
    rest = consumed(sampler, sampler.advance(Position.start(4), 4096), 9000 - 4096, 3)
    assert first + rest == uninterrupted


def test_cursors_count_each_sources_samples() -> None:
    sampler = sampler_of()
    position = sampler.advance(Position.start(4), 5000)
    counts = np.bincount(sampler.sources_of(0, 5000), minlength=4)
    assert position == Position(5000, tuple(counts.tolist()))


def test_a_changed_schedule_continues_every_source_where_it_stopped() -> None:
    old = sampler_of()
    position = old.advance(Position.start(4), 3000)
    new = sampler_of({"curve": "linear", "growth": 10, "start": {"sft": 1}, "end": {"zh-web": 1}})
    plan, _ = new.plan(position, 500)
    for source in range(4):
        ordinals = plan.ordinals[plan.sources == source]
        expected = np.arange(position.cursors[source], position.cursors[source] + len(ordinals))
        np.testing.assert_array_equal(ordinals, expected)


def test_a_source_added_on_resume_starts_at_zero() -> None:
    state = {"next_sample": 10, "cursors": {"en-web": 6, "zh-web": 4}}
    assert Position.from_dict(state, NAMES) == Position(10, (6, 4, 0, 0))


def test_zero_weight_source_is_never_chosen() -> None:
    sampler = sampler_of(
        {"curve": "linear", "growth": 100, "start": {"en-web": 1}, "end": {"zh-web": 1, "sft": 0}}
    )
    sources = sampler.sources_of(0, 20_000)
    assert not np.isin(sources, [2, 3]).any()
    assert (sources[:50] == 0).mean() > 0.5 and (sources[200:] == 1).all()
