"""A small client of Prometheus' HTTP query API (instant and range queries): standard library."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

TIMEOUT = 30  # seconds; a range query over weeks of a large run takes a few


class PrometheusError(Exception):
    """Prometheus could not be reached, or refused the query (its message says why)."""


def query(url: str, expr: str, time: float | None = None) -> list[dict[str, Any]]:
    """The instant vector of `expr` at `time` (default: now).

    [{"metric": {label: value}, "value": [t, "v"]}, ...]
    """
    params = {"query": expr} | ({"time": f"{time:.3f}"} if time is not None else {})
    return _get(url, "query", params)


def query_range(url: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    """The series of `expr` from `start` to `end` (Unix seconds) every `step` seconds.

    [{"metric": {label: value}, "values": [[t, "v"], ...]}, ...]
    """
    params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:.3f}"}
    return _get(url, "query_range", params)


def _get(url: str, endpoint: str, params: dict[str, str]) -> list[dict[str, Any]]:
    address = f"{url.rstrip('/')}/api/v1/{endpoint}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(address, timeout=TIMEOUT) as response:
            body = json.load(response)
    except urllib.error.HTTPError as e:  # a bad query: 400 with Prometheus' error in the body
        try:
            body = json.load(e)
        except ValueError:
            raise PrometheusError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise PrometheusError(f"{url}: {getattr(e, 'reason', e)}") from None
    if body.get("status") != "success":
        raise PrometheusError(f"{params['query']!r}: {body.get('error', body)}")
    return body["data"]["result"]
