"""`chatflow-operator`: run the operator, or print the CRD it serves or the TrainJob runtime."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import kopf

from chatflow.spec import DEFAULT_IMAGE
from chatflow_operator import crd, handlers, metrics
from chatflow_operator.backends import trainjob


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatflow-operator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    crd_command = commands.add_parser(
        "crd", help="print the ChatFlowRun CustomResourceDefinition (YAML)"
    )
    crd_command.add_argument(
        "--helm", action="store_true", help="as the Helm chart's template (templates/crd.yaml)"
    )
    runtime_command = commands.add_parser(
        "runtime",
        help="print the ClusterTrainingRuntime that runs' TrainJobs run on (backend trainjob)",
    )
    runtime_command.add_argument(
        "--image", default=DEFAULT_IMAGE, help="the trainer image its data preparation runs"
    )
    runtime_command.add_argument(
        "--helm",
        action="store_true",
        help="as the Helm chart's template (templates/clustertrainingruntime.yaml)",
    )
    run = commands.add_parser("run", help="reconcile ChatFlowRuns into PyTorchJobs or TrainJobs")
    scope = run.add_mutually_exclusive_group(required=True)
    scope.add_argument(
        "--namespace", action="append", help="watch this namespace (repeat for several)"
    )
    scope.add_argument("--all-namespaces", action="store_true", help="watch the whole cluster")
    peers = run.add_mutually_exclusive_group()
    peers.add_argument(
        "--peering",
        default="chatflow-operator",
        help="KopfPeering (ClusterKopfPeering with --all-namespaces) shared with other instances: "
        "while one with a higher --priority is alive, this one does nothing",
    )
    peers.add_argument("--standalone", action="store_true", help="no peering (one instance only)")
    run.add_argument("--priority", type=int, default=0)
    run.add_argument("--metrics-port", type=int, default=8000, help="Prometheus /metrics; 0: off")
    run.add_argument("--liveness-port", type=int, default=8080, help="/healthz; 0: off")
    run.add_argument(
        "--progress-seconds",
        type=float,
        default=15,
        help="how often to read a running trainer's progress into the run's status",
    )
    run.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "crd":
        sys.stdout.write(crd.crd_helm_template() if args.helm else crd.crd_yaml())
        return 0
    if args.command == "runtime":
        sys.stdout.write(
            trainjob.runtime_helm_template() if args.helm else trainjob.runtime_yaml(args.image)
        )
        return 0

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # kopf logs every handler call of every object; our reconciler logs what it changes.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    kopf.run(
        registry=handlers.registry(args.progress_seconds),
        clusterwide=args.all_namespaces,
        namespaces=args.namespace or (),
        standalone=args.standalone,
        peering_name=None if args.standalone else args.peering,
        priority=args.priority,
        liveness_endpoint=(
            f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None
        ),
    )
    return 0
