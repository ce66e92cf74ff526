"""kopf's bookkeeping of each run, kept in this process's memory instead of in annotations.

By default kopf writes to every object it handles: the state it last handled (to tell a change
from a new object) and each handler's progress (retries, delays), plus a marker. Each of those is a
write to the run, validated by the API server against the CRD's schema and CEL rules, and at 200
runs they cost more than the PyTorchJobs themselves (docs/benchmarks.md).

The reconciler is level-triggered, so nothing here needs to survive a restart: an operator that has
forgotten a run treats it as new and reconciles it once, as it does every run on startup anyway. The
one write kopf still makes is the "touch" that wakes a delayed retry: a failed pass.
"""

from __future__ import annotations

import kopf

from chatflow.spec import API_GROUP


class MemoryDiffBase(kopf.DiffBaseStorage):
    """The state of each run that kopf last handled, by uid."""

    def __init__(self) -> None:
        super().__init__()
        self._handled: dict[str, kopf.BodyEssence] = {}

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return self._handled.get(body.metadata.uid)

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        self._handled[body.metadata.uid] = essence

    def forget(self, uid: str) -> None:
        self._handled.pop(uid, None)


class MemoryProgress(kopf.ProgressStorage):
    """Each handler's progress on each run, by uid and handler id."""

    def __init__(self) -> None:
        super().__init__()
        self._records: dict[tuple[str, str], kopf.ProgressRecord] = {}
        self._touch = kopf.AnnotationsProgressStorage(prefix=API_GROUP)

    def fetch(self, *, key: str, body: kopf.Body) -> kopf.ProgressRecord | None:
        return self._records.get((body.metadata.uid, key))

    def store(
        self, *, key: str, record: kopf.ProgressRecord, body: kopf.Body, patch: kopf.Patch
    ) -> None:
        self._records[body.metadata.uid, key] = record

    def purge(self, *, key: str, body: kopf.Body, patch: kopf.Patch) -> None:
        self._records.pop((body.metadata.uid, key), None)

    def touch(self, *, body: kopf.Body, patch: kopf.Patch, value: str | None) -> None:
        self._touch.touch(body=body, patch=patch, value=value)

    def clear(self, *, essence: kopf.BodyEssence) -> kopf.BodyEssence:
        return self._touch.clear(essence=essence)

    def forget(self, uid: str) -> None:
        for key in [key for key in self._records if key[0] == uid]:
            del self._records[key]
