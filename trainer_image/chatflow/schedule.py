"""The mixture schedule: target weight of every source as a function of training progress.

Every curve reduces to knots (progress, weight vector) and a rule between them:
linear and points interpolate linearly, cosine eases, stages hold each vector until its `until`.
Weight vectors are normalised at the knots, so every interpolated vector also sums to 1.

Progress is counted in the schedule's unit. A training sample is one packed sequence of exactly
`seqLength` positions, so "tokens" progress at sample n is n * seqLength: the schedule stays a pure
function of the sample index, which the sampler needs for exact resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from chatflow.spec import ChatFlowRunSpec, Weights


@dataclass(frozen=True)
class Schedule:
    sources: tuple[str, ...]
    curve: str
    knots: np.ndarray  # (M,) progress at each knot, increasing
    weights: np.ndarray  # (M, K) normalised weight vector at each knot
    phases: tuple[str, ...]  # phase names; phase i ends at knots[i + 1] (stages: at their `until`)
    tokens_per_sample: int  # 1 when progress counts samples

    @classmethod
    def from_spec(cls, spec: ChatFlowRunSpec) -> Schedule:
        sources = spec.source_names
        s = spec.schedule

        def vector(weights: Weights) -> np.ndarray:
            v = np.array([weights.get(name, 0.0) for name in sources], dtype=np.float64)
            return v / v.sum()

        if s.curve in ("linear", "cosine"):
            assert s.growth and s.start is not None and s.end is not None
            knots, vectors, phases = [0, s.growth], [s.start, s.end], ("growth", "final")
        elif s.curve == "points":
            assert s.points
            knots = [p.at for p in s.points]
            vectors = [p.weights for p in s.points]
            phases = ("ramp", "final") if len(knots) > 1 else ("final",)
        else:
            assert s.stages
            # A stage's knot is where it ends; the last one runs forever.
            knots = [st.until if st.until is not None else np.inf for st in s.stages]
            vectors = [st.weights for st in s.stages]
            phases = tuple(st.name or f"stage-{i}" for i, st in enumerate(s.stages))
        return cls(
            sources=sources,
            curve=s.curve,
            knots=np.asarray(knots, dtype=np.float64),
            weights=np.stack([vector(w) for w in vectors]),
            phases=phases,
            tokens_per_sample=spec.training.seq_length if s.unit == "tokens" else 1,
        )

    @property
    def horizon(self) -> float:
        """Progress after which the mixture no longer changes."""
        finite = self.knots[np.isfinite(self.knots)]
        if self.curve == "stages":
            return float(finite[-1]) if finite.size else 0.0
        return float(self.knots[-1])

    def progress(self, sample: np.ndarray | int) -> np.ndarray:
        """Progress, in the schedule's unit, before global sample `sample` is drawn."""
        return np.asarray(sample, dtype=np.float64) * self.tokens_per_sample

    def weights_at(self, progress: np.ndarray | float) -> np.ndarray:
        """Target weights at each progress value: shape (..., K), each row sums to 1."""
        x = np.asarray(progress, dtype=np.float64)
        if self.curve == "stages":
            return self.weights[
                np.searchsorted(self.knots, x, side="right").clip(max=len(self.knots) - 1)
            ]
        if self.curve == "cosine":
            t = np.clip(x / self.knots[-1], 0.0, 1.0)
            x = self.knots[-1] * (1.0 - np.cos(np.pi * t)) / 2.0
        if len(self.knots) == 1:
            return np.broadcast_to(self.weights[0], (*x.shape, len(self.sources))).copy()
        columns = [np.interp(x, self.knots, self.weights[:, k]) for k in range(len(self.sources))]
        return np.stack(columns, axis=-1)

    def fraction_done(self, progress: np.ndarray | float) -> np.ndarray:
        """How far through the schedule's changes (0..1); 1 once the mixture is final."""
        horizon = self.horizon
        x = np.asarray(progress, dtype=np.float64)
        return np.ones_like(x) if horizon <= 0 else np.clip(x / horizon, 0.0, 1.0)

    def phase_at(self, progress: float) -> tuple[int, str]:
        """(index, name) of the schedule phase at `progress`."""
        if self.curve == "stages":
            i = int(np.searchsorted(self.knots, progress, side="right"))
        else:
            i = int(progress >= self.horizon)
        i = min(i, len(self.phases) - 1)
        return i, self.phases[i]
