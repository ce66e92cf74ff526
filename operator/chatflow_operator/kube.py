"""The few Kubernetes API calls the operator makes, as plain dicts in and out.

One generic REST helper instead of the generated typed clients: every object the operator touches
(runs, the job backends' jobs, batch Jobs, ConfigMaps, pods) is handled the same way, as JSON, and
nothing is converted into model classes and back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kubernetes import client, config

from chatflow.spec import API_GROUP


@dataclass(frozen=True)
class Resource:
    """A kind of object the operator reads or writes: the one spelling of it, for REST paths and
    for kopf's watches."""

    group: str  # "" for the core API
    version: str
    plural: str

    @property
    def api(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    @property
    def watched(self) -> tuple[str, ...]:
        """The resource as kopf's handler decorators take it."""
        return (
            (self.group, self.version, self.plural) if self.group else (self.version, self.plural)
        )

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        path = f"{self.api}/namespaces/{namespace}/{self.plural}"
        return "/".join(p for p in (path, name, subresource) if p)


RUNS = Resource(API_GROUP, "v1alpha1", "chatflowruns")
BATCH_JOBS = Resource("batch", "v1", "jobs")  # the data preparation
CONFIG_MAPS = Resource("", "v1", "configmaps")
PODS = Resource("", "v1", "pods")

MERGE_PATCH = "application/merge-patch+json"


class ApiError(Exception):
    def __init__(self, status: int, method: str, path: str, detail: str) -> None:
        super().__init__(f"{method} {path}: {status} {detail}")
        self.status = status


class Conflict(ApiError):
    """409: the object already exists (create) or changed under us."""


class Kube:
    def __init__(self, api_client: client.ApiClient | None = None, connections: int = 4) -> None:
        """`connections`: as many as threads call at once; with fewer, every call beyond them
        opens (and TLS-handshakes) a connection of its own and drops it afterwards."""
        if api_client is None:
            configuration = client.Configuration()
            try:
                config.load_incluster_config(client_configuration=configuration)
            except config.ConfigException:
                config.load_kube_config(client_configuration=configuration)
            configuration.connection_pool_maxsize = connections
            api_client = client.ApiClient(configuration)
        self.api_client = api_client

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        request = self.api_client.param_serialize(
            method,
            path,
            query_params=list((query or {}).items()),
            header_params={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(*request)
        data = response.read()
        if response.status >= 400:
            try:
                detail = json.loads(data).get("message", "")
            except ValueError:
                detail = data[:200].decode(errors="replace")
            error = Conflict if response.status == 409 else ApiError
            raise error(response.status, method, path, detail)
        return json.loads(data or b"{}")

    def get(self, resource: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call("GET", resource.path(namespace, name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def list(self, resource: Resource, namespace: str, selector: str) -> list[dict[str, Any]]:
        found = self._call("GET", resource.path(namespace), query={"labelSelector": selector})
        return found.get("items", [])

    def create(self, resource: Resource, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", resource.path(body["metadata"]["namespace"]), body)

    def patch(
        self,
        resource: Resource,
        namespace: str,
        name: str,
        patch: dict[str, Any],
        subresource: str | None = None,
    ) -> dict[str, Any]:
        path = resource.path(namespace, name, subresource)
        return self._call("PATCH", path, patch, content_type=MERGE_PATCH)

    def delete(
        self, resource: Resource, namespace: str, name: str, foreground: bool = False
    ) -> None:
        body = {"propagationPolicy": "Foreground" if foreground else "Background"}
        try:
            self._call("DELETE", resource.path(namespace, name), body)
        except ApiError as e:
            if e.status != 404:
                raise
