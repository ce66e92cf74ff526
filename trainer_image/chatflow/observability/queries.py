"""Every PromQL expression of the dashboard, the report and the alerts, each under a name.

Panel and report queries select one run with the dashboard's variables, `$namespace` and `$run`,
and take rates over Grafana's `$__rate_interval`; `fill` replaces them where Grafana is not there
to (the report, the tests). They aggregate away the scrape target's labels (pod, instance), so a
run's lines continue across pod restarts.

Alert expressions cover every run at once; those on the trainer's metrics keep its `namespace` and
`run` labels, which name the run in the alert.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatflow import metric_names as names

RUN = 'namespace=~"$namespace", run=~"$run"'
WINDOW = "$__rate_interval"

# The scrape jobs of manifests/monitoring (the PodMonitors set the trainers' and the data
# preparations' job labels).
TRAINER_JOB = "chatflow-trainer"
PREPARATION_JOB = "chatflow-preparation"
OPERATOR_JOB = "chatflow-operator"


@dataclass(frozen=True)
class Query:
    """A panel's or the report's PromQL, and its series' legend (a Grafana `{{label}}` template)."""

    expr: str
    legend: str = ""


def fill(expr: str, *, run: str, namespace: str = ".*", window: str = "1m") -> str:
    """The expression with the dashboard's variables replaced: one run, rates over `window`."""
    return (
        expr.replace("$namespace", namespace)
        .replace("$run", run)
        .replace("$__rate_interval", window)
    )


# --- the schedule and the mixture ----------------------------------------------------------------

MIXTURE_TARGET = Query(f"max by (source) ({names.MIXTURE_TARGET}{{{RUN}}})", "{{source}} planned")
# Realised over the rate window, from the sample counters: the exported realised ratio is one
# step's draw, which a scrape samples at random, so a line of it jitters with the batch size.
MIXTURE_REALISED = Query(
    f"sum by (source) (rate({names.SOURCE_SAMPLES}{{{RUN}}}[{WINDOW}]))"
    f" / ignoring (source) group_left sum(rate({names.SAMPLES}{{{RUN}}}[{WINDOW}]))",
    "{{source}} realised",
)
SCHEDULE_PROGRESS = Query(f"max({names.SCHEDULE_PROGRESS}{{{RUN}}})", "progress")
SCHEDULE_PHASE = Query(f"max({names.SCHEDULE_PHASE}{{{RUN}}})", "phase index")
SCHEDULE_PHASE_NAME = Query(f"max by (phase) ({names.SCHEDULE_PHASE_INFO}{{{RUN}}})", "{{phase}}")

# --- data drawn ----------------------------------------------------------------------------------

SOURCE_SAMPLES = Query(f"max by (source) ({names.SOURCE_SAMPLES}{{{RUN}}})", "{{source}}")
SOURCE_TOKENS = Query(f"max by (source) ({names.SOURCE_TOKENS}{{{RUN}}})", "{{source}}")
SOURCE_EPOCHS = Query(f"max by (source) ({names.SOURCE_EPOCHS}{{{RUN}}})", "{{source}}")
# The global sample count: the report's x axis, matching `chatflow schedule --png`.
SAMPLES = Query(f"max({names.SAMPLES}{{{RUN}}})", "samples")
# The report's check that a run name, in any namespace, means one run.
SAMPLES_BY_NAMESPACE = Query(f"max by (namespace) ({names.SAMPLES}{{{RUN}}})", "{{namespace}}")

# --- data preparation (`chatflow prepare`, the Job before the training job) ----------------------

PREPARATION_SHARDS_DONE = Query(
    f"max by (source) ({names.PREPARE_SHARDS_DONE}{{{RUN}}})", "{{source}} done"
)
PREPARATION_SHARDS_NEEDED = Query(
    f"max by (source) ({names.PREPARE_SHARDS_TOTAL}{{{RUN}}})", "{{source}} needed"
)
PREPARATION_TOKEN_RATE = Query(
    f"sum by (source) (rate({names.PREPARE_TOKENS}{{{RUN}}}[{WINDOW}]))", "{{source}}"
)

# --- cross-lingual transfer ----------------------------------------------------------------------

HELDOUT_LOSS = Query(
    f"max by (source, language) ({names.HELDOUT_LOSS}{{{RUN}}})", "{{source}} ({{language}})"
)

# --- training ------------------------------------------------------------------------------------

LOSS = Query(f"max({names.LOSS}{{{RUN}}})", "loss")
LEARNING_RATE = Query(f"max({names.LEARNING_RATE}{{{RUN}}})", "learning rate")
TOKENS_PER_SECOND = Query(f"max({names.TOKENS_PER_SECOND}{{{RUN}}})", "tokens/s")
GRAD_NORM = Query(f"max({names.GRAD_NORM}{{{RUN}}})", "gradient norm")
MFU = Query(f"max({names.MFU}{{{RUN}}})", "MFU")

# --- checkpoints ---------------------------------------------------------------------------------

STEP = Query(f"max({names.STEP}{{{RUN}}})", "step")
CHECKPOINTS = Query(f"max({names.CHECKPOINTS}{{{RUN}}})", "checkpoints")
LAST_CHECKPOINT_STEP = Query(f"max({names.LAST_CHECKPOINT_STEP}{{{RUN}}})", "last checkpoint")
# Mean since the trainer process started: checkpoints are too rare for a rate window to hold one.
CHECKPOINT_SECONDS = Query(
    f"max({names.CHECKPOINT_DURATION}_sum{{{RUN}}} / {names.CHECKPOINT_DURATION}_count{{{RUN}}})",
    "mean seconds",
)

# --- health --------------------------------------------------------------------------------------

# The master pod of the run's job (`<run>-<digest>-master-0`, see the operator's render.py): `up`
# carries the target's labels only, not the trainer's `run`.
TRAINER_UP = Query(
    f'up{{job="{TRAINER_JOB}", namespace=~"$namespace", pod=~"($run)-[0-9a-f]{{8}}-master-0"}}',
    "{{pod}}",
)
SAMPLE_RATE = Query(f"sum(rate({names.SAMPLES}{{{RUN}}}[{WINDOW}]))", "samples/s")
OPERATOR_UP = Query(f'up{{job="{OPERATOR_JOB}"}}', "{{instance}}")
# The operator creates every trigger's error series at 0, so this is 0, not "no data", until the
# first error.
OPERATOR_ERRORS = Query(
    f"sum by (trigger) (rate({names.OPERATOR_RECONCILE_ERRORS}[{WINDOW}]))",
    "{{trigger}}",
)
OPERATOR_RUNS = Query(f"sum by (phase) ({names.OPERATOR_RUNS})", "{{phase}}")

# --- GPUs (NVIDIA's DCGM exporter) ---------------------------------------------------------------

# The run's pods (`<run>-<digest>-master-0`, `-worker-N`), by the labels DCGM's Kubernetes mapping
# puts on each GPU's series. Scraped with honor_labels, as the GPU operator's ServiceMonitor does:
# without it they arrive as exported_pod and exported_namespace.
_POD_OF_RUN = "(.+)-[0-9a-f]{8}-(?:master|worker)-[0-9]+"
RUN_PODS = 'namespace=~"$namespace", pod=~"($run)-[0-9a-f]{8}-(master|worker)-[0-9]+"'
# Means over the run's GPUs, and the least busy: a straggler that holds the others back.
GPU_UTILISATION = Query(f"avg({names.DCGM_GPU_UTIL}{{{RUN_PODS}}}) / 100", "mean")
GPU_UTILISATION_LOWEST = Query(f"min({names.DCGM_GPU_UTIL}{{{RUN_PODS}}}) / 100", "lowest")
GPU_TENSOR_ACTIVE = Query(f"avg({names.DCGM_TENSOR_ACTIVE}{{{RUN_PODS}}})", "tensor pipes, mean")
GPU_MEMORY_USED = Query(
    f"max by (pod) ({names.DCGM_FB_USED}{{{RUN_PODS}}}) * 2^20", "{{pod}} (fullest GPU)"
)
GPU_POWER = Query(f"sum by (pod) ({names.DCGM_POWER}{{{RUN_PODS}}})", "{{pod}}")
GPU_XID = Query(f"max by (pod, gpu) ({names.DCGM_XID_ERRORS}{{{RUN_PODS}}})", "{{pod}} GPU {{gpu}}")

# --- alerts --------------------------------------------------------------------------------------

# The operator counts runs by phase but does not name them: `kubectl get chatflowruns -A` does.
RUN_FAILED = f'{names.OPERATOR_RUNS}{{phase="Failed"}} > 0'
# No sample for 15 minutes while the trainer answers scrapes (a finished or deleted run's target is
# gone, so its `up` is absent). Checkpoints and evaluations pause training too: the alert's `for`
# leaves them time.
RUN_STALLED = f"rate({names.SAMPLES}[15m]) == 0 and on (job, instance) up == 1"
# Step throughput (it leaves out evaluation and checkpoint time), smoothed over 10 minutes.
THROUGHPUT_DROPPED = (
    f"avg_over_time({names.TOKENS_PER_SECOND}[10m])"
    f" < 0.5 * avg_over_time({names.TOKENS_PER_SECOND}[1h])"
)
# A preparation with shards left that has written no token in 15 minutes, and ran 15 minutes ago
# (so a preparation that is starting, loading its tokenizer and opening its sources, is not
# stalled). Summed over sources: its workers may finish one source while another waits its turn.
_PREPARATION = "sum by (namespace, run)"
PREPARATION_STALLED = (
    f"{_PREPARATION} (increase({names.PREPARE_TOKENS}[15m])) == 0"
    f" and on (namespace, run) {_PREPARATION} ({names.PREPARE_TOKENS} offset 15m)"
    f" and on (namespace, run) {_PREPARATION} ({names.PREPARE_SHARDS_DONE})"
    f" < {_PREPARATION} ({names.PREPARE_SHARDS_TOTAL})"
)
# A source past its first full pass is being repeated.
SOURCE_REPEATING = f"{names.SOURCE_EPOCHS} >= 1"
# A source past 90% of its maxEpochs: the run fails when it passes the limit (RUN_FAILED). Sources
# without a limit have no max-epochs series, so they never match.
SOURCE_NEAR_EPOCH_LIMIT = f"{names.SOURCE_EPOCHS} / {names.SOURCE_MAX_EPOCHS} > 0.9"
# Held-out loss 5% above its best of the last 2 hours. As the mixture moves off a source (English,
# say), its loss rising is the forgetting that cross-lingual transfer should prevent.
HELDOUT_LOSS_RISING = f"{names.HELDOUT_LOSS} > 1.05 * min_over_time({names.HELDOUT_LOSS}[2h])"
# An XID error (a nonzero code) on a GPU of a ChatFlowRun's pod. The pod's name gives the run;
# joining on the trainer's own series keeps other jobs' pods of the same name pattern out.
GPU_XID_ERROR = (
    f'label_replace({names.DCGM_XID_ERRORS}, "run", "$1", "pod", "{_POD_OF_RUN}") > 0'
    f" and on (namespace, run) max by (namespace, run) ({names.STEP})"
)
