"""Progress POSTed to Kubeflow Trainer's status server, against a real local HTTPS server."""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from chatflow.train import trainer_status
from chatflow.train.trainer_status import TrainerStatus

PATH = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/team/trainjobs/tiny/status"
TOTAL_STEPS = 110
METRICS = {"chatflow_loss": 1.234, "chatflow_step": 30, "chatflow_schedule_phase_info": "warmup"}
WAIT = 30.0  # seconds: generous, only a bound for a broken test


@dataclass
class Certs:
    ca: Path  # the CA the trainer is given
    server: tuple[Path, Path]  # certificate and key, signed by `ca`
    stranger: tuple[Path, Path]  # certificate and key, self-signed: not trusted


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("certs")
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"]
    leaf = ["-addext", "subjectAltName=IP:127.0.0.1", "-addext", "basicConstraints=CA:FALSE"]

    def req(name: str, *args: str) -> tuple[Path, Path]:
        crt, pem = d / f"{name}.crt", d / f"{name}.key"
        command = ["openssl", "req", "-x509", *key, "-keyout", pem, "-out", crt, *args]
        subprocess.run([*command, "-subj", f"/CN={name}"], check=True, capture_output=True)
        return crt, pem

    ca, ca_key = req("test-ca")
    server = req("server", "-CA", str(ca), "-CAkey", str(ca_key), *leaf)
    return Certs(ca, server, req("stranger", *leaf))


@dataclass
class Server:
    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200  # what it answers


def serve(cert: tuple[Path, Path]) -> Iterator[Server]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            server.requests.append({"path": self.path, "headers": self.headers, "body": body})
            self.send_response(server.status)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*cert)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    server = Server(f"https://127.0.0.1:{httpd.server_address[1]}{PATH}")
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield server
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def server(certs: Certs) -> Iterator[Server]:
    yield from serve(certs.server)


@pytest.fixture
def stranger(certs: Certs) -> Iterator[Server]:
    """A server whose certificate the trainer's CA did not sign."""
    yield from serve(certs.stranger)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def token(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("first-token\n")
    return path


def reporter(
    url: str, certs: Certs, token: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> TrainerStatus:
    """A TrainerStatus made the way the trainer makes it: from the variables Trainer injects."""
    monkeypatch.setenv(trainer_status.URL_ENV, url)
    monkeypatch.setenv(trainer_status.CA_CERT_ENV, str(certs.ca))
    monkeypatch.setenv(trainer_status.TOKEN_ENV, str(token))
    status = TrainerStatus.from_env(TOTAL_STEPS, interval=15.0, clock=clock)
    assert status is not None
    return status


def sent(server: Server) -> list[dict[str, Any]]:
    return [json.loads(r["body"])["trainerStatus"] for r in server.requests]


def test_nothing_outside_a_trainjob_with_the_status_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(trainer_status.URL_ENV, raising=False)
    assert TrainerStatus.from_env(TOTAL_STEPS) is None


def test_progress_eta_and_metrics_are_posted_with_the_bearer_token(
    server: Server, certs: Certs, token: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    status = reporter(server.url, certs, token, clock, monkeypatch)
    status.started(10)  # resumed at step 10: the rate counts only the steps done since
    clock.now += 20.0
    status.update(30, METRICS)  # 20 steps in 20 s, 80 to go
    assert status.wait(WAIT)

    (request,) = server.requests
    assert request["path"] == PATH
    assert request["headers"]["Authorization"] == "Bearer first-token"
    assert request["headers"]["Content-Type"] == "application/json"
    body = json.loads(request["body"])
    assert body.keys() == {"trainerStatus"}
    (update,) = sent(server)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", update.pop("lastUpdatedTime"))
    assert update == {
        "progressPercentage": 27,  # 30 of 110, rounded down: 100 only when done
        "estimatedRemainingSeconds": 80,
        "metrics": [
            {"name": "chatflow_loss", "value": "1.234"},
            {"name": "chatflow_step", "value": "30"},
            {"name": "chatflow_schedule_phase_info", "value": "warmup"},
        ],
    }


def test_the_token_file_is_read_again_for_each_request(
    server: Server, certs: Certs, token: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    status = reporter(server.url, certs, token, clock, monkeypatch)
    status.update(1, METRICS)
    assert status.wait(WAIT)
    token.write_text("rotated-token\n")  # kubelet replaced it
    clock.now += 15.0
    status.update(2, METRICS)
    assert status.wait(WAIT)

    tokens = [r["headers"]["Authorization"] for r in server.requests]
    assert tokens == ["Bearer first-token", "Bearer rotated-token"]


def test_updates_within_the_interval_make_one_request_then_the_final_one(
    server: Server, certs: Certs, token: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    status = reporter(server.url, certs, token, clock, monkeypatch)
    status.started(0)
    for step in range(1, TOTAL_STEPS + 1):
        clock.now += 0.1  # 11 s in all: under the interval
        status.update(step, {**METRICS, "chatflow_step": step})
    status.finish(timeout=WAIT)

    first, final = sent(server)
    assert first["progressPercentage"] == 0
    assert first["estimatedRemainingSeconds"] == 11  # 1 step in 0.1 s, 109 to go
    assert final["progressPercentage"] == 100
    assert final["estimatedRemainingSeconds"] == 0
    assert {"name": "chatflow_step", "value": str(TOTAL_STEPS)} in final["metrics"]


def test_a_server_the_ca_did_not_sign_is_refused_and_training_goes_on(
    stranger: Server,
    certs: Certs,
    token: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    status = reporter(stranger.url, certs, token, clock, monkeypatch)
    with caplog.at_level(logging.WARNING, logger=trainer_status.__name__):
        status.update(1, METRICS)
        assert status.wait(WAIT)
        clock.now += 15.0
        status.update(2, METRICS)
        status.finish(timeout=WAIT)

    assert stranger.requests == []  # the TLS handshake failed: no token was sent
    (warning,) = caplog.records  # three failures of one kind, logged once
    assert "CERTIFICATE_VERIFY_FAILED" in warning.getMessage()


def test_server_errors_are_logged_once_and_never_raised(
    server: Server,
    certs: Certs,
    token: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server.status = 500
    clock = Clock()
    status = reporter(server.url, certs, token, clock, monkeypatch)
    with caplog.at_level(logging.WARNING, logger=trainer_status.__name__):
        status.update(1, METRICS)
        assert status.wait(WAIT)
        clock.now += 15.0
        status.update(2, METRICS)
        status.finish(timeout=WAIT)

    assert len(server.requests) == 3
    (warning,) = caplog.records
    assert "500" in warning.getMessage()


def test_an_unreachable_server_never_raises_nor_holds_up_the_end(
    certs: Certs, token: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    status = reporter(f"https://127.0.0.1:{port}{PATH}", certs, token, Clock(), monkeypatch)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=trainer_status.__name__):
        status.update(1, METRICS)
        status.finish(timeout=WAIT)
    assert time.monotonic() - start < WAIT
    assert [r.levelname for r in caplog.records] == ["WARNING"]
