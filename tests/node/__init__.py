"""A real Kubernetes node on this host, for end-to-end tests: pods from our own images run.

    with Node(workdir) as node:
        node.kubectl("apply", "-f", pod_yaml)  # scheduled, its image in the local store, run

Its control plane (node.cp, tests/controlplane) and beside it: kube-scheduler; the Kubeflow
training operator; containerd (runc, overlayfs) with the images that
images.sh builds from our Dockerfiles; kubelet; kube-proxy (iptables); a CNI bridge; CoreDNS for
cluster.local; a hostPath PersistentVolume as the cluster's storage; on request, fake GPU nodes
that kwok plays (Node.fake_gpu_nodes). See README.md for what each needs and why. The node changes
the host (an interface, a bridge, sysctls, iptables rules, cgroups, directories the kubelet
insists on): HostChanges records each change before it is made, in a file under RUN_DIR, and
stop() undoes them. A run killed before it could clean up is undone
by the next start. One node per host at a time: a second waits for the first.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from chatflow.spec import DEFAULT_IMAGE
from cluster import free_port, tool_output
from controlplane import CommandError, ControlPlane, binaries

HERE = Path(__file__).resolve().parent
NODE_NAME = "chatflow-node"
# TEST-NET-2, never routed anywhere, on a veth pair of our own (this kernel has no dummy links;
# TEST-NET-1 may be the host's own network).
NODE_IP = "198.51.100.2"
NODE_LINK, NODE_LINK_PEER = "chatflow0", "chatflow1"
POD_CIDR = "10.244.0.0/16"  # not 10.88/16, which buildah's default isolation takes for itself
BRIDGE = "chatflow-cni0"
CLUSTER_DOMAIN = "cluster.local"
# Sockets and runtime state: short paths (a socket's is limited to 108 bytes), on tmpfs.
RUN_DIR = Path("/run/chatflow-test-node")
CACHE = Path(os.environ.get("CHATFLOW_CACHE_DIR", Path.home() / ".cache" / "chatflow"))
# containerd's root holds the image store: kept between runs, so images are imported once.
CONTAINERD_ROOT = CACHE / "node" / "containerd"
# The sysctls this node or its processes set (the kubelet sets the last three).
SYSCTLS = (
    "net.ipv4.ip_forward",
    "net.bridge.bridge-nf-call-iptables",
    "net.ipv4.conf.all.route_localnet",
    "vm.overcommit_memory",
    "kernel.panic",
    "kernel.panic_on_oops",
)
# The training operator's webhook server reads its certificate from here, a constant of its source.
WEBHOOK_CERTS = Path("/tmp/k8s-webhook-server/serving-certs")
# Directories the kubelet and containerd create at fixed places, whatever their configuration.
HOST_DIRS = ("/var/lib/kubelet", "/var/log/containers", "/var/log/pods", "/run/netns", "/etc/cni",
             str(WEBHOOK_CERTS.parent))  # fmt: skip
IPTABLES_TABLES = ("filter", "nat", "mangle", "raw")
CGROUP_ROOT = "chatflow-test-node"  # the kubelet's --cgroup-root, in every v1 hierarchy
PACKAGES = ("containerd", "runc", "containernetworking-plugins", "iptables", "conntrack",
            "buildah", "debootstrap")  # fmt: skip
START_TIMEOUT = 120  # seconds
# The controllers built from Go modules (tests/tools): the training operator, Trainer v2 and the
# JobSet controller its TrainJobs run on.
TOOLS = ("training-operator.sh", "trainer.sh", "jobset.sh")
# Fake GPU nodes (Node.fake_gpu_nodes): kwok manages only nodes with this label, never ours.
FAKE_NODE_LABEL = "chatflow.io/fake-gpu-node"
# Their addresses, which nothing connects to (no kubelet listens; a scrape of a pod's metrics
# times out): node IPs beside NODE_IP in TEST-NET-2, pod IPs in TEST-NET-3, never routed.
FAKE_NODE_IPS = "198.51.100.{}"  # .10, .11, ...
FAKE_POD_CIDR = "203.0.113.0/24"
# What a GPU node pool's node carries (an 8-GPU H100 server; labels from NVIDIA's GPU feature
# discovery) and the taint that keeps pods that want no GPU off it (GKE's, which
# manifests/examples/llama2-7b-zh.yaml tolerates). The real node's pods tolerate none.
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
# The workers' init container: wait until the master's name resolves (argv: name, tries).
WAIT_FOR_MASTER = """
import socket, sys, time
for _ in range(int(sys.argv[2])):
    try:
        socket.getaddrinfo(sys.argv[1], None)
        sys.exit(0)
    except OSError:
        time.sleep(1)
sys.exit(f"{sys.argv[1]} did not resolve")
"""


def install_packages() -> None:
    """The Debian packages the node and the image builds need (apt-get, once per machine)."""
    installed = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${Status}\n", *PACKAGES],
        capture_output=True, text=True,
    ).stdout  # fmt: skip
    missing = [p for p in PACKAGES if f"{p} install ok installed" not in installed]
    if missing:
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


def build_images() -> dict[str, str]:
    """Build (or find cached) the images; {name: image} for trainer, operator and pause."""
    out = subprocess.run([HERE / "images.sh"], check=True, stdout=subprocess.PIPE, text=True)
    return dict(line.split() for line in out.stdout.splitlines() if line.count(" ") == 1)


def _tool(script: str) -> Path:
    """A binary that tests/tools/<script> builds (cached), by the path it prints last."""
    return tool_output(script)[-1]


def _serving_certificate(directory: Path) -> str:
    """A CA and, signed by it, tls.crt/tls.key for 127.0.0.1 in `directory`, where the webhook
    servers of the Trainer and JobSet managers read them; the CA, base64, for a caBundle."""
    directory.mkdir(parents=True)
    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "30")
    _run("openssl", "req", "-x509", *key, "-subj", "/CN=chatflow-test-webhook-ca",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         "-keyout", directory / "ca.key", "-out", directory / "ca.crt")  # fmt: skip
    _run("openssl", "req", "-x509", *key, "-subj", "/CN=chatflow-test-webhook",
         "-CA", directory / "ca.crt", "-CAkey", directory / "ca.key",
         "-addext", "basicConstraints=critical,CA:FALSE", "-addext", "extendedKeyUsage=serverAuth",
         "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", directory / "tls.key", "-out", directory / "tls.crt")  # fmt: skip
    return base64.b64encode((directory / "ca.crt").read_bytes()).decode()


def _webhooks(ca_bundle: str, jobset_port: int, trainer_port: int) -> str:
    """The admission webhooks of JobSet (config/components/webhook/ of its module) and Trainer
    (manifests/base/webhook/), calling the managers on this host: JobSet's mutating one defaults
    what Trainer's JobSets leave out, and its reconciler cannot do without; Trainer's validate
    the runtime and TrainJobs that chatflow makes."""

    def hook(name: str, port: int, path: str, resource: str, operations: list[str],
             selector: str | None = None) -> dict[str, Any]:  # fmt: skip
        group, version, plural = resource.split("/")  # "" is the core group
        hook = {
            "name": name,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "clientConfig": {"url": f"https://127.0.0.1:{port}{path}", "caBundle": ca_bundle},
            "rules": [{"apiGroups": [group], "apiVersions": [version], "operations": operations,
                       "resources": [plural]}],
        }  # fmt: skip
        if selector:
            hook["objectSelector"] = {"matchExpressions": [{"key": selector, "operator": "Exists"}]}
        return hook

    jobsets, pods = "jobset.x-k8s.io/v1alpha2/jobsets", "/v1/pods"
    jobset_pod = "jobset.sigs.k8s.io/jobset-name"
    trainer = "trainer.kubeflow.org/v1alpha1/"
    trainer_path = "-trainer-kubeflow-org-v1alpha1-"
    configurations = {
        ("MutatingWebhookConfiguration", "jobset-mutating-webhook-configuration"): [
            hook("mjobset.kb.io", jobset_port, "/mutate-jobset-x-k8s-io-v1alpha2-jobset", jobsets,
                 ["CREATE"]),
            hook("mpod.kb.io", jobset_port, "/mutate--v1-pod", pods, ["CREATE"], jobset_pod),
        ],
        ("ValidatingWebhookConfiguration", "jobset-validating-webhook-configuration"): [
            hook("vjobset.kb.io", jobset_port, "/validate-jobset-x-k8s-io-v1alpha2-jobset",
                 jobsets, ["CREATE", "UPDATE"]),
            hook("vpod.kb.io", jobset_port, "/validate--v1-pod", pods, ["CREATE"], jobset_pod),
        ],
        ("MutatingWebhookConfiguration", "defaulter.trainer.kubeflow.org"): [
            hook("defaulter.trainjob.trainer.kubeflow.org", trainer_port,
                 f"/mutate{trainer_path}trainjob", f"{trainer}trainjobs", ["CREATE", "UPDATE"]),
        ],
        ("ValidatingWebhookConfiguration", "validator.trainer.kubeflow.org"): [
            hook(f"validator.{kind}.trainer.kubeflow.org", trainer_port,
                 f"/validate{trainer_path}{kind}", f"{trainer}{kind}s", ["CREATE", "UPDATE"])
            for kind in ("clustertrainingruntime", "trainingruntime", "trainjob")
        ],
    }  # fmt: skip
    return yaml.safe_dump_all(
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": kind,
            "metadata": {"name": name},
            "webhooks": webhooks,
        }
        for (kind, name), webhooks in configurations.items()
    )


class HostChanges:
    """What the node changed on the host, saved before each change so it can be undone, even by
    a later run when this one was killed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.record: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record))
        tmp.replace(self.path)

    def snapshot(self, mount_roots: list[Path]) -> None:
        """Record the sysctls and iptables rules as they are now, and which directories exist."""
        self.record["sysctls"] = {key: _sysctl(key) for key in SYSCTLS}
        for family in ("iptables", "ip6tables"):
            # Listing a table creates it (nf_tables), so the dump holds every table that
            # kube-proxy and the CNI plugins write to, and restoring it empties them again.
            for table in IPTABLES_TABLES:
                _run(family, "-t", table, "-S")
            self.record[family] = _run(f"{family}-save").stdout
        self.record["netns"] = (
            sorted(os.listdir("/run/netns")) if Path("/run/netns").exists() else []
        )
        self.record["created"] = [d for d in HOST_DIRS if not Path(d).exists()]
        self.record["mount_roots"] = [str(p) for p in mount_roots]
        self._save()

    def set_sysctl(self, key: str, value: str) -> None:
        Path("/proc/sys", key.replace(".", "/")).write_text(value)

    def restore(self) -> None:
        """Undo everything recorded; each step independent of the others' success."""
        if not self.record:
            return
        steps: list[Callable[[], object]] = [
            _kill_leftovers,
            lambda: _run("ip", "link", "delete", NODE_LINK, check=False),
            lambda: _run("ip", "link", "delete", BRIDGE, check=False),
            self._unmount,
            self._remove_netns,
            lambda: _restore_iptables("iptables-restore", self.record.get("iptables")),
            lambda: _restore_iptables("ip6tables-restore", self.record.get("ip6tables")),
            self._remove_cgroups,
            self._remove_dirs,
        ]
        for key, value in self.record["sysctls"].items():
            steps.append(lambda key=key, value=value: self.set_sysctl(key, value))
        errors = []
        for step in steps:
            try:
                step()
            except Exception as e:  # every step runs; all failures are reported
                errors.append(repr(e))
        if errors:
            raise RuntimeError(
                "could not undo all of the node's host changes: " + "; ".join(errors)
            )
        self.path.unlink(missing_ok=True)
        self.record = {}

    def _remove_netns(self) -> None:
        """Network namespaces of pods that containerd did not tear down (it was killed)."""
        netns = Path("/run/netns")
        for name in set(os.listdir(netns) if netns.exists() else ()) - set(self.record["netns"]):
            _run("umount", netns / name, check=False)
            (netns / name).unlink(missing_ok=True)

    def _remove_cgroups(self) -> None:
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            root = hierarchy / CGROUP_ROOT
            if root.is_dir():
                # Children before parents; a cgroup is removed with rmdir, its files go with it.
                for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
                    if path.is_dir():
                        path.rmdir()
                root.rmdir()

    def _unmount(self) -> None:
        """What a killed kubelet or containerd left mounted: pods' volumes, containers' root
        filesystems and shm."""
        roots = [*self.record["created"], *self.record["mount_roots"]]
        for line in reversed(Path("/proc/self/mounts").read_text().splitlines()):
            target = line.split()[1]
            if any(target.startswith(f"{root}/") for root in roots):
                _run("umount", "-l", target, check=False)

    def _remove_dirs(self) -> None:
        for d in self.record["created"]:
            shutil.rmtree(d, ignore_errors=True)
        # The node's runtime state (containerd's, CNI address leases); the lock stays.
        for state in RUN_DIR.iterdir():
            if state.is_dir():
                shutil.rmtree(state, ignore_errors=True)


class Node:
    """A control plane and one node: containerd, kubelet, kube-proxy, CoreDNS, kube-scheduler and
    the training operator; files and logs in workdir."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.cp = ControlPlane(self.workdir / "controlplane", node_ip=NODE_IP)
        self.kubectl = self.cp.kubectl
        self.images: dict[str, str] = {}
        self.storage = self.workdir / "volumes"  # the hostPath PersistentVolumes' directories
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock: int | None = None
        self._host: HostChanges | None = None
        self.tools: dict[str, Path] = {}  # {tests/tools script: the binary it built}

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def containerd_socket(self) -> Path:
        return RUN_DIR / "containerd.sock"

    def start(self) -> Node:
        install_packages()
        # The Go builds of the controllers (cold: minutes each) beside the image builds.
        with ThreadPoolExecutor(len(TOOLS)) as pool:
            builds = {script: pool.submit(_tool, script) for script in TOOLS}
            self.images = build_images()
            self.tools = {script: build.result() for script, build in builds.items()}
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(RUN_DIR / "lock", os.O_CREAT | os.O_RDWR)
        fcntl.flock(self._lock, fcntl.LOCK_EX)  # another session's node: wait for its end
        self._host = HostChanges(RUN_DIR / "host-changes.json")
        try:
            self._host.restore()  # what a killed run left (nothing, usually)
            self._host.snapshot([self.workdir, CONTAINERD_ROOT, RUN_DIR])
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        _run("ip", "link", "add", NODE_LINK, "type", "veth", "peer", "name", NODE_LINK_PEER)
        _run("ip", "addr", "add", f"{NODE_IP}/32", "dev", NODE_LINK)
        for link in (NODE_LINK, NODE_LINK_PEER):
            _run("ip", "link", "set", link, "up")
        self.cp.start()
        assert self._host is not None
        self._host.set_sysctl("net.ipv4.ip_forward", "1")
        # Pod-to-Service traffic that stays on the bridge must pass kube-proxy's iptables rules.
        self._host.set_sysctl("net.bridge.bridge-nf-call-iptables", "1")
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            if hierarchy.is_dir() and (hierarchy / "cgroup.procs").exists():
                (hierarchy / CGROUP_ROOT).mkdir(exist_ok=True)

        admin = str(self.cp.kubeconfig)
        self._spawn(
            "kube-scheduler", binaries() / "kube-scheduler",
            f"--kubeconfig={admin}", "--leader-elect=false", "--secure-port=0",
        )  # fmt: skip
        self._start_containerd()
        subprocess.run(
            [HERE / "images.sh", "--import", self.containerd_socket],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        self._start_coredns(admin)
        self._start_kubelet()
        self._start_kube_proxy()
        self._start_training_operator(admin)
        self._start_trainer_v2(admin)
        self._wait(
            "the node to be Ready",
            lambda: (
                self.kubectl(
                    "wait",
                    "--for=condition=Ready",
                    f"node/{NODE_NAME}",
                    "--timeout=1s",
                    check=False,
                ).returncode
                == 0
            ),
        )
        self.storage.mkdir(exist_ok=True)

    def _start_containerd(self) -> None:
        CONTAINERD_ROOT.mkdir(parents=True, exist_ok=True)
        cni = self.workdir / "cni"
        cni.mkdir(exist_ok=True)
        bridge = {
            "type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": True,
            # A pod that reaches itself through its Service comes back in over the bridge.
            "hairpinMode": True,
            "ipam": {
                "type": "host-local", "ranges": [[{"subnet": POD_CIDR}]],
                "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(RUN_DIR / "ipam"),
            },
        }  # fmt: skip
        network = {
            "cniVersion": "1.0.0",
            "name": "chatflow-test",
            "plugins": [bridge, {"type": "portmap", "capabilities": {"portMappings": True}}],
        }
        (cni / "10-chatflow.conflist").write_text(json.dumps(network))
        cri = "plugins.'io.containerd.grpc.v1.cri'"
        config = f"""
version = 2
root = "{CONTAINERD_ROOT}"
state = "{RUN_DIR / "containerd"}"
[grpc]
  address = "{self.containerd_socket}"
[plugins.'io.containerd.internal.v1.opt']
  path = "{RUN_DIR / "opt"}"
[{cri}]
  sandbox_image = "{self.images["pause"]}"
  # Without CAP_SYS_RESOURCE runc cannot lower a container's oom_score_adj below its parent's.
  restrict_oom_score_adj = true
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{cni}"
"""
        (self.workdir / "containerd.toml").write_text(config)
        self._spawn("containerd", "containerd", f"--config={self.workdir / 'containerd.toml'}")
        self._wait(
            "containerd",
            lambda: (
                _run("ctr", "--address", self.containerd_socket, "version", check=False).returncode
                == 0
            ),
        )

    def _start_coredns(self, kubeconfig: str) -> None:
        ready = free_port()
        corefile = f"""
.:53 {{
    bind {NODE_IP}
    errors
    ready 127.0.0.1:{ready}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
}}
"""
        (self.workdir / "Corefile").write_text(corefile)
        self._spawn("coredns", _tool("coredns.sh"), "-conf", str(self.workdir / "Corefile"))
        self._wait("CoreDNS", lambda: _http_ok(f"http://127.0.0.1:{ready}/ready"))

    def _start_kubelet(self) -> None:
        kubeconfig = self.cp.kubeconfig_for_user(
            f"system:node:{NODE_NAME}", ("system:nodes",), self.workdir / "kubelet.kubeconfig"
        )
        healthz = free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": f"/{CGROUP_ROOT}",
            "failCgroupV1": False,  # this host has cgroup v1
            "failSwapOn": False,
            "address": NODE_IP,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": healthz,
            "clusterDNS": [NODE_IP],
            "clusterDomain": CLUSTER_DOMAIN,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(self.cp.ca_file)},
            },
            "authorization": {"mode": "AlwaysAllow"},  # the apiserver is its only client
            "podLogsDir": str(self.workdir / "pod-logs"),
            # The host's disk is shared and partly full: evict nothing, remove no image (the
            # trainer's is gigabytes, imported once).
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
        }
        (self.workdir / "kubelet.yaml").write_text(yaml.safe_dump(config))
        self._spawn(
            "kubelet", binaries() / "kubelet",
            f"--config={self.workdir / 'kubelet.yaml'}",
            f"--kubeconfig={kubeconfig}",
            f"--root-dir={self.workdir / 'kubelet'}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={NODE_IP}",
        )  # fmt: skip
        self._wait("the kubelet", lambda: _http_ok(f"http://127.0.0.1:{healthz}/healthz"))

    def _start_kube_proxy(self) -> None:
        kubeconfig = self.cp.kubeconfig_for_user(
            "system:kube-proxy", (), self.workdir / "kube-proxy.kubeconfig"
        )
        self._spawn(
            "kube-proxy", binaries() / "kube-proxy",
            f"--kubeconfig={kubeconfig}",
            f"--hostname-override={NODE_NAME}",
            "--proxy-mode=iptables",
            f"--cluster-cidr={POD_CIDR}",
            f"--nodeport-addresses={NODE_IP}/32",
            # Leave the host's conntrack settings alone.
            "--conntrack-max-per-core=0",
            "--conntrack-tcp-timeout-established=0",
            "--conntrack-tcp-timeout-close-wait=0",
            f"--metrics-bind-address=127.0.0.1:{free_port()}",
            f"--healthz-bind-address=127.0.0.1:{free_port()}",
        )  # fmt: skip

    def _start_training_operator(self, kubeconfig: str) -> None:
        """Kubeflow's training operator v1.9.3, out of cluster (see tests/tools/training-operator.sh
        for what it needs and why)."""
        self.cp.install_pytorchjob_crd()
        self.kubectl("create", "namespace", "kubeflow")
        self.kubectl("create", "secret", "generic", "training-operator-webhook-cert",
                     "--namespace=kubeflow")  # fmt: skip
        # Any key pair: no admission webhook is registered that the apiserver would call.
        WEBHOOK_CERTS.mkdir(parents=True, exist_ok=True)
        _run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-days", "30", "-subj", "/CN=training-operator",
             "-keyout", WEBHOOK_CERTS / "tls.key", "-out", WEBHOOK_CERTS / "tls.crt")  # fmt: skip
        # Workers wait for the master's DNS name in an init container; the operator's default is
        # alpine's nslookup, which no registry here serves: the trainer image's Python does it.
        init = [{
            "name": "init-pytorch",
            "image": "{{.InitContainerImage}}",
            "imagePullPolicy": "IfNotPresent",
            "command": ["python3", "-c", WAIT_FOR_MASTER, "{{.MasterAddr}}", "{{.MaxTries}}"],
            "resources": {"requests": {"cpu": "10m", "memory": "20Mi"},
                          "limits": {"cpu": "100m", "memory": "64Mi"}},
        }]  # fmt: skip
        (self.workdir / "pytorch-init.yaml").write_text(yaml.safe_dump(init))
        probes = free_port()
        self._spawn(
            "training-operator", self.tools["training-operator.sh"],
            f"--kubeconfig={kubeconfig}",
            "--enable-scheme=pytorchjob",
            f"--metrics-bind-address=127.0.0.1:{free_port()}",
            f"--health-probe-bind-address=127.0.0.1:{probes}",
            f"--webhook-server-port={free_port()}",
            f"--pytorch-init-container-image={DEFAULT_IMAGE}",
            f"--pytorch-init-container-template-file={self.workdir / 'pytorch-init.yaml'}",
        )  # fmt: skip
        self._wait("the training operator", lambda: _http_ok(f"http://127.0.0.1:{probes}/readyz"))

    def _start_trainer_v2(self, kubeconfig: str) -> None:
        """Kubeflow Trainer v2.3.0's manager and the JobSet manager whose JobSets it makes, out of
        cluster (see the headers of tests/tools/trainer.sh and jobset.sh), their webhooks
        registered. Without the TrainJobStatus gate: its status server needs an API server whose
        service-account issuer it can discover, and a namespace file only pods have."""
        for crd in (*tool_output("jobset.sh", "--crds"), *tool_output("trainer.sh", "--crds")):
            self.cp.install_crd(crd)
        certs = self.workdir / "trainer-v2-certs"
        ca_bundle = _serving_certificate(certs / "k8s-webhook-server" / "serving-certs")
        jobset_port, trainer_port = free_port(), free_port()
        self.cp.apply(_webhooks(ca_bundle, jobset_port, trainer_port))

        probes = free_port()
        config = self.workdir / "jobset-config.yaml"
        config.write_text(yaml.safe_dump({
            "apiVersion": "config.jobset.x-k8s.io/v1alpha1",
            "kind": "Configuration",
            "webhook": {"port": jobset_port, "host": "127.0.0.1",
                        "certDir": str(certs / "k8s-webhook-server" / "serving-certs")},
            "health": {"healthProbeBindAddress": f"127.0.0.1:{probes}"},
            "internalCertManagement": {"enable": False},
        }))  # fmt: skip
        self._spawn("jobset", self.tools["jobset.sh"], f"--config={config}",
                    f"--kubeconfig={kubeconfig}", "--leader-elect=false",
                    "--metrics-bind-address=0")  # fmt: skip
        self._wait("the JobSet manager", lambda: _http_ok(f"http://127.0.0.1:{probes}/readyz"))

        probes = free_port()
        config = self.workdir / "trainer-config.yaml"
        config.write_text(yaml.safe_dump({
            "apiVersion": "config.trainer.kubeflow.org/v1alpha1",
            "kind": "Configuration",
            "webhook": {"port": trainer_port, "host": "127.0.0.1"},
            "metrics": {"bindAddress": "0"},
            "health": {"healthProbeBindAddress": f"127.0.0.1:{probes}"},
            "certManagement": {"enable": False},
        }))  # fmt: skip
        # Its webhook server's certificate: only in $TMPDIR/k8s-webhook-server/serving-certs.
        self._spawn("trainer", self.tools["trainer.sh"], f"--config={config}",
                    f"--kubeconfig={kubeconfig}", env={"TMPDIR": str(certs)})  # fmt: skip
        self._wait("the Trainer manager", lambda: _http_ok(f"http://127.0.0.1:{probes}/readyz"))

    def add_volume(self, name: str, claim: tuple[str, str], size: str = "20Gi") -> Path:
        """A hostPath PersistentVolume for the claim (namespace, name), which binds to it as
        to a provisioner's (ReadWriteMany: the node is the only one); returns its directory."""
        path = self.storage / name
        path.mkdir(mode=0o777)
        path.chmod(0o777)  # any pod user writes there, as on a fresh network volume
        pv = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": name},
            "spec": {
                "capacity": {"storage": size},
                "accessModes": ["ReadWriteOnce", "ReadWriteMany"],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "hostPath": {"path": str(path), "type": "Directory"},
                "claimRef": {"namespace": claim[0], "name": claim[1]},
            },
        }
        self.cp.apply(yaml.safe_dump(pv))
        return path

    @contextmanager
    def fake_gpu_nodes(self, count: int, gpus: int = 8) -> Iterator[list[str]]:
        """`count` fake nodes with `gpus` nvidia.com/gpu each beside the real one, faked by kwok
        (tests/tools/kwok.sh): the scheduler places pods on them as on a GPU node pool, and kwok
        marks the pods Running; nothing runs. Yields their names; removes them, and their pods,
        on exit.

            with node.fake_gpu_nodes(4) as names:  # the paper's 4 nodes x 8 GPUs
        """
        names = [f"chatflow-gpu-{i}" for i in range(count)]
        selector = f"{FAKE_NODE_LABEL}=true"
        kwok = _tool("kwok.sh")
        self._spawn(
            "kwok", kwok,
            f"--config={kwok.parent / 'stages.yaml'}",
            f"--kubeconfig={self.cp.kubeconfig}",
            # Standalone kwok keeps no Leases without it, and the node controller then marks its
            # nodes NotReady after its grace period (see kwok.sh).
            "--node-lease-duration-seconds=40",
            # The real node is the kubelet's: kwok must never write its status or its pods'.
            "--manage-all-nodes=false",
            f"--manage-nodes-with-label-selector={selector}",
            f"--cidr={FAKE_POD_CIDR}",
            f"--node-ip={FAKE_NODE_IPS.format(10)}",
        )  # fmt: skip
        try:
            resources = {"cpu": "224", "memory": "2Ti", "pods": "110",
                         "ephemeral-storage": "30Ti", GPU_RESOURCE: str(gpus)}  # fmt: skip
            nodes = [
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "labels": {
                            FAKE_NODE_LABEL: "true",
                            "kubernetes.io/hostname": name,
                            "kubernetes.io/os": "linux",
                            "kubernetes.io/arch": "amd64",
                            f"{GPU_RESOURCE}.present": "true",
                            f"{GPU_RESOURCE}.count": str(gpus),
                            f"{GPU_RESOURCE}.product": GPU_PRODUCT,
                        },
                    },
                    "spec": {"taints": [GPU_TAINT]},
                    # Created with its status: kwok's node-initialize keeps capacity, allocatable
                    # and addresses that are there, and adds the conditions.
                    "status": {
                        "capacity": resources,
                        "allocatable": resources,
                        "addresses": [
                            {"type": "InternalIP", "address": FAKE_NODE_IPS.format(10 + i)},
                            {"type": "Hostname", "address": name},
                        ],
                    },
                }
                for i, name in enumerate(names)
            ]
            self.kubectl("create", "-f", "-", input=yaml.safe_dump_all(nodes))

            def ready() -> bool:
                # Ready, and the not-ready taint the apiserver gives every new node removed by
                # the node controller: only then does the scheduler consider the node.
                got = json.loads(self.kubectl("get", "nodes", "-l", selector, "-o", "json").stdout)
                return len(got["items"]) == count and all(
                    any(c["type"] == "Ready" and c["status"] == "True"
                        for c in n["status"].get("conditions", []))
                    and n["spec"].get("taints") == [GPU_TAINT]
                    for n in got["items"]
                )  # fmt: skip

            self._wait(f"{count} fake GPU nodes to be Ready", ready)
            yield names
        finally:
            try:
                # Their pods first, while kwok still runs; then the nodes (their Leases go with
                # them, owned by them).
                for name in names:
                    self.kubectl("delete", "pods", "--all-namespaces",
                                 f"--field-selector=spec.nodeName={name}",
                                 "--force", "--grace-period=0", check=False)  # fmt: skip
                self.kubectl("delete", "nodes", "-l", selector, "--ignore-not-found")
            finally:
                _terminate(self._procs.pop("kwok"))

    def stop(self) -> None:
        """Remove every pod, stop every process, undo every host change."""
        try:
            if "kubelet" in self._procs and self._procs["kubelet"].poll() is None:
                self._remove_pods()
        finally:
            for name, proc in reversed(self._procs.items()):
                if name == "containerd":
                    self._remove_containers()
                _terminate(proc)
            self._procs.clear()
            self.cp.stop()
            if self._host is not None:
                self._host.restore()
            if self._lock is not None:
                os.close(self._lock)
                self._lock = None

    def _remove_pods(self) -> None:
        """Delete every pod and wait until the kubelet has stopped their containers and torn down
        their sandboxes (network namespaces, CNI addresses)."""
        # Cordoned first, or Deployments and jobs would place new pods as fast as these go.
        self.kubectl("cordon", NODE_NAME, check=False)
        self.kubectl("delete", "pods", "--all", "--all-namespaces", "--grace-period=0",
                     "--force", "--wait=false", check=False)  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ps = _run("ctr", "--address", self.containerd_socket, "-n", "k8s.io", "tasks", "ls",
                      "-q", check=False)  # fmt: skip
            if ps.returncode == 0 and not ps.stdout.strip():
                return
            time.sleep(0.5)

    def _remove_containers(self) -> None:
        """Kill what is still running (the kubelet was killed too early), so no shim outlives
        containerd."""
        ctr = ("ctr", "--address", self.containerd_socket, "-n", "k8s.io")
        tasks = _run(*ctr, "tasks", "ls", "-q", check=False).stdout.split()
        for task in tasks:
            _run(*ctr, "tasks", "kill", "-s", "SIGKILL", task, check=False)
        for task in tasks:
            _run(*ctr, "tasks", "delete", "-f", task, check=False)
        for container in _run(*ctr, "containers", "ls", "-q", check=False).stdout.split():
            _run(*ctr, "containers", "delete", container, check=False)

    def logs(self, *names: str, lines: int = 30) -> str:
        tails = []
        for name in names or self._procs:
            log = self.workdir / f"{name}.log"
            if log.exists():
                text = log.read_text(errors="replace").splitlines()[-lines:]
                tails.append(f"==> {log} <==\n" + "\n".join(text))
        return "\n".join(tails)

    def _spawn(self, name: str, *command: object, env: dict[str, str] | None = None) -> None:
        with (self.workdir / f"{name}.log").open("ab") as log:
            # setpriv: the kernel kills the process when this one dies (see ControlPlane).
            self._procs[name] = subprocess.Popen(
                ["setpriv", "--pdeathsig=KILL", "--", *map(str, command)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=None if env is None else os.environ | env,
            )  # fmt: skip

    def _wait(self, what: str, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited before {what}:\n" + self.logs(name))
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not after {START_TIMEOUT}s\n" + self.logs())
            time.sleep(0.2)


def _kill_leftovers() -> None:
    """Containers and shims the node started that outlived its containerd (it was killed before
    it could stop them): the processes in the kubelet's cgroups, and the shims serving our
    containerd socket."""
    pids = set()
    for procs in Path("/sys/fs/cgroup").glob(f"*/{CGROUP_ROOT}/**/cgroup.procs"):
        pids.update(int(pid) for pid in procs.read_text().split())
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(RUN_DIR).encode() in cmdline.read_bytes() and b"containerd-shim" in (
                cmdline.read_bytes()
            ):
                pids.add(int(cmdline.parent.name))
        except OSError:
            continue  # gone meanwhile
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)


def _sysctl(key: str) -> str:
    return Path("/proc/sys", key.replace(".", "/")).read_text().strip()


def _restore_iptables(command: str, saved: object) -> None:
    if isinstance(saved, str):
        _run(command, input=saved)


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _run(
    *args: object, input: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    cmd = [str(a) for a in args]
    result = subprocess.run(cmd, input=input, capture_output=True, text=True)
    if check and result.returncode:
        raise CommandError(result.returncode, cmd, result.stdout, result.stderr)
    return result
