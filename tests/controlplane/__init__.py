"""A real Kubernetes control plane for integration tests.

etcd, kube-apiserver and kube-controller-manager, built by build.sh (see README.md), run as local
processes on free 127.0.0.1 ports; the apiserver authorizes with RBAC. No scheduler or kubelet
runs: pods are stored, never run. With `node_ip`, the apiserver serves on that address instead,
for the real node of tests/node (see there).

    with ControlPlane(tmp_path) as cp:
        cp.install_pytorchjob_crd()
        cp.kubectl("get", "pytorchjobs", "-A")
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from pathlib import Path

import kubernetes
import yaml

HERE = Path(__file__).resolve().parent
PROCESSES = ("etcd", "kube-apiserver", "kube-controller-manager")  # in start order
START_TIMEOUT = 60  # seconds; a warm start takes a few
STOP_TIMEOUT = 10  # seconds from SIGTERM to SIGKILL
# P-256 keys: generated in milliseconds, where RSA keys take a noticeable part of the start.
EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
LEAF = ("basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature")
SERVICE_CIDR = "10.96.0.0/16"  # ClusterIPs


@functools.cache
def binaries() -> Path:
    """The directory of the control plane's binaries; build.sh builds them unless cached."""
    out = subprocess.run([HERE / "build.sh"], check=True, stdout=subprocess.PIPE, text=True).stdout
    return Path(out.splitlines()[-1])


class CommandError(subprocess.CalledProcessError):
    """A failed command, whose message includes what it wrote to stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.stderr}"


class ControlPlane:
    """A control plane whose files (certificates, etcd data, process logs) live in workdir."""

    def __init__(self, workdir: Path, node_ip: str | None = None) -> None:
        """With node_ip (an address of this host), the control plane of a real node: the
        apiserver serves and advertises there, so pods reach it through the `kubernetes`
        Service; nodes are authorized as nodes; pods get ServiceAccount tokens."""
        self.workdir = Path(workdir)
        self.node_ip = node_ip
        self.certs = self.workdir / "certs"
        self.ca_file = self.certs / "ca.crt"
        self.kubeconfig = self.workdir / "kubeconfig"  # the admin's (group system:masters)
        self.pytorchjob_crd = binaries().parent / "kubeflow.org_pytorchjobs.yaml"
        self.server = ""  # the apiserver's URL, once started
        self._procs: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> ControlPlane:
        """Start etcd, kube-apiserver and kube-controller-manager; return once they serve."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.certs.mkdir(parents=True, exist_ok=True)
        etcd_port, peer_port, api_port = _free_ports(3)
        etcd, peer = f"http://127.0.0.1:{etcd_port}", f"http://127.0.0.1:{peer_port}"
        address = self.node_ip or "127.0.0.1"
        self.server = f"https://{address}:{api_port}"
        self._spawn(
            "etcd",
            "--name=test",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={etcd}",
            f"--advertise-client-urls={etcd}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=test={peer}",
            "--unsafe-no-fsync",  # throwaway data: durability only costs time
            "--log-level=warn",
        )
        # While etcd starts; the apiserver waits for it.
        self._make_certs()
        c = self.certs
        self._spawn(
            "kube-apiserver",
            f"--etcd-servers={etcd}",
            f"--secure-port={api_port}",
            f"--bind-address={address}",
            # Not the host's default interface, which a sandbox may lack.
            f"--advertise-address={address}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--tls-cert-file={c / 'apiserver.crt'}",
            f"--tls-private-key-file={c / 'apiserver.key'}",
            f"--client-ca-file={self.ca_file}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-account-key-file={c / 'sa.pub'}",
            f"--service-account-signing-key-file={c / 'sa.key'}",
            *(
                (
                    "--authorization-mode=Node,RBAC",
                    # For `kubectl logs` and `exec`: the kubelet trusts this CA's clients.
                    f"--kubelet-client-certificate={c / 'apiserver-kubelet-client.crt'}",
                    f"--kubelet-client-key={c / 'apiserver-kubelet-client.key'}",
                    # The node's name is no host name this machine resolves.
                    "--kubelet-preferred-address-types=InternalIP",
                )
                if self.node_ip
                else (
                    "--authorization-mode=RBAC",
                    # The default reconciler makes the advertised address the endpoint of the
                    # `kubernetes` Service, and Endpoints reject loopback addresses.
                    "--endpoint-reconciler-type=none",
                    # It rejects pods in a namespace whose `default` ServiceAccount the controller
                    # manager has not created yet; no kubelet mounts the token it adds anyway.
                    "--disable-admission-plugins=ServiceAccount",
                )
            ),
        )
        self._write_kubeconfig(
            self.kubeconfig,
            {"client-certificate": str(c / "admin.crt"), "client-key": str(c / "admin.key")},
        )
        self._ssl = ssl.create_default_context(cafile=self.ca_file)
        self._ssl.load_cert_chain(c / "admin.crt", c / "admin.key")
        self._wait("kube-apiserver", lambda: self._get("/readyz") == 200)
        self._spawn(
            "kube-controller-manager",
            f"--kubeconfig={self.kubeconfig}",
            "--controllers=*",
            "--leader-elect=false",
            "--secure-port=0",
            # For the token controller (ServiceAccount token Secrets) and the kube-root-ca.crt
            # ConfigMap it publishes in every namespace.
            f"--service-account-private-key-file={c / 'sa.key'}",
            f"--root-ca-file={self.ca_file}",
        )
        # Its ServiceAccount controller creating `default` in the default namespace shows its
        # controllers run.
        self._wait(
            "kube-controller-manager",
            lambda: self._get("/api/v1/namespaces/default/serviceaccounts/default") == 200,
        )

    def stop(self) -> None:
        """SIGTERM each process, etcd last; SIGKILL one that outlives STOP_TIMEOUT."""
        for proc in reversed(self._procs.values()):
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()

    def logs(self, *names: str, lines: int = 30) -> str:
        """The last lines of the named processes' logs (all by default), for failure messages."""
        tails = []
        for name in names or PROCESSES:
            log = self.workdir / f"{name}.log"
            if log.exists():
                with log.open(errors="replace") as f:
                    tails.append(f"==> {log} <==\n{''.join(deque(f, lines))}")
        return "\n".join(tails)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl as the admin; with check, raise CommandError on failure."""
        cmd = [
            "kubectl",
            f"--kubeconfig={self.kubeconfig}",
            # Discovery cached per control plane: the user's cache may hold another one's at
            # the same port.
            f"--cache-dir={self.workdir / 'kubectl-cache'}",
            *args,
        ]
        result = subprocess.run(cmd, input=input, capture_output=True, text=True)
        if check and result.returncode:
            raise CommandError(result.returncode, cmd, result.stdout, result.stderr)
        return result

    def apply(
        self, manifest: str | Path, server_side: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """kubectl apply a manifest: YAML text (str) or a file (Path)."""
        args = ["apply", "--server-side"] if server_side else ["apply"]
        if isinstance(manifest, Path):
            return self.kubectl(*args, "-f", str(manifest))
        return self.kubectl(*args, "-f", "-", input=manifest)

    def install_pytorchjob_crd(self) -> None:
        """Install Kubeflow's PyTorchJob CRD and wait until it is served."""
        self.install_crd(self.pytorchjob_crd)

    def install_crd(self, path: Path) -> None:
        """Install the CRD in the file `path` and wait until it is served."""
        # Server-side: CRDs are often too large for the last-applied annotation of a client-side
        # apply.
        self.apply(path, server_side=True)
        crd = "crd/" + yaml.safe_load(path.read_text())["metadata"]["name"]
        # Retried: until the CRD has a status, kubectl wait fails (".status.conditions accessor
        # error") rather than waiting.
        self._wait(
            crd,
            lambda: (
                self.kubectl("wait", "--for=condition=Established", crd, check=False).returncode
                == 0
            ),
        )

    def kubeconfig_for_token(self, token: str, path: Path) -> Path:
        """Write a kubeconfig that authenticates with a bearer token; return its path."""
        return self._write_kubeconfig(Path(path), {"token": token})

    def kubeconfig_for_service_account(self, namespace: str, name: str, path: Path) -> Path:
        """Write a kubeconfig acting as an existing ServiceAccount (a one-hour token)."""
        token = self.kubectl("create", "token", name, f"--namespace={namespace}").stdout.strip()
        return self.kubeconfig_for_token(token, path)

    def api_client(self) -> kubernetes.client.ApiClient:
        """A Python client acting as the admin."""
        return kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))

    def kubeconfig_for_user(self, user: str, groups: tuple[str, ...], path: Path) -> Path:
        """Write a kubeconfig with a client certificate for user in groups; return its path."""
        name = path.stem
        subject = "".join(f"/O={group}" for group in groups) + f"/CN={user}"
        self._cert(name, subject, *LEAF, "extendedKeyUsage=clientAuth")
        client = {"client-certificate": f"{self.certs / name}.crt"}
        return self._write_kubeconfig(path, client | {"client-key": f"{self.certs / name}.key"})

    def _make_certs(self) -> None:
        """A CA; the apiserver's serving certificate, and its client certificate for kubelets;
        the admin's client certificate, in group system:masters; the key pair that signs
        ServiceAccount tokens."""
        c = self.certs
        # Python's ssl (strict X.509 checks from 3.13) wants the CA's key usage spelled out.
        self._cert("ca", "/CN=chatflow-test-ca", "keyUsage=critical,keyCertSign,cRLSign")
        # Pods call the apiserver as kubernetes.default.svc at the Service range's first address.
        names = "IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc,DNS:kubernetes.default"
        names += f",IP:{ipaddress.ip_network(SERVICE_CIDR)[1]}"
        if self.node_ip:
            names += f",IP:{self.node_ip}"
        self._cert(
            "apiserver", "/CN=kube-apiserver", *LEAF, "extendedKeyUsage=serverAuth",
            f"subjectAltName={names}",
        )  # fmt: skip
        self._cert("admin", "/O=system:masters/CN=admin", *LEAF, "extendedKeyUsage=clientAuth")
        self._cert(
            "apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client",
            *LEAF, "extendedKeyUsage=clientAuth",
        )  # fmt: skip
        _run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", c / "sa.key")
        _run("openssl", "pkey", "-in", c / "sa.key", "-pubout", "-out", c / "sa.pub")

    def _cert(self, name: str, subject: str, *extensions: str) -> None:
        """certs/name.crt and .key, signed by the CA (self-signed for the CA itself)."""
        c = self.certs
        ca = ("-CA", c / "ca.crt", "-CAkey", c / "ca.key") if name != "ca" else ()
        _run(
            "openssl", "req", "-x509", *EC_KEY, *ca, "-days", "3650", "-subj", subject,
            "-keyout", c / f"{name}.key", "-out", c / f"{name}.crt",
            *(arg for ext in extensions for arg in ("-addext", ext)),
        )  # fmt: skip

    def _spawn(self, name: str, *args: str) -> None:
        with (self.workdir / f"{name}.log").open("ab") as log:
            # setpriv: the kernel kills the process when this one dies, even where stop() cannot
            # run (SIGKILL). "Dies" is the exit of the thread that starts it.
            self._procs[name] = subprocess.Popen(
                ["setpriv", "--pdeathsig=KILL", "--", binaries() / name, *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def _wait(self, what: str, ready: Callable[[], bool]) -> None:
        """Poll ready until it holds; raise with logs if a process exits or START_TIMEOUT passes."""
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited ({proc.returncode}) before {what} was ready:\n"
                        + self.logs(name)
                    )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{what} not ready after {START_TIMEOUT}s:\n" + self.logs(*self._procs)
                )
            time.sleep(0.1)

    def _get(self, path: str) -> int | None:
        """The HTTP status of the admin's GET of path; None while the apiserver does not answer."""
        try:
            with urllib.request.urlopen(self.server + path, context=self._ssl, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def _write_kubeconfig(self, path: Path, user: dict[str, str]) -> Path:
        cluster = {"server": self.server, "certificate-authority": str(self.ca_file)}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": cluster}],
            "users": [{"name": "user", "user": user}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "user"}}],
            "current-context": "test",
        }
        path.write_text(yaml.safe_dump(config))
        return path


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1, distinct: each socket stays bound until all are chosen."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _run(*args: object) -> None:
    cmd = [str(a) for a in args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise CommandError(result.returncode, cmd, result.stdout, result.stderr)
