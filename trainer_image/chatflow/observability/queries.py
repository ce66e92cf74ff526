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

RUN = 'namespace=~"$namespace", run=~"$run"'
WINDOW = "$__rate_interval"

# The scrape jobs of manifests/monitoring (the PodMonitor sets the trainers' job label).
TRAINER_JOB = "chatflow-trainer"
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

MIXTURE_TARGET = Query(
    f"max by (source) (chatflow_mixture_target_ratio{{{RUN}}})", "{{source}} planned"
)
# Realised over the rate window, from the sample counters: the exported realised ratio is one
# step's draw, which a scrape samples at random, so a line of it jitters with the batch size.
MIXTURE_REALISED = Query(
    f"sum by (source) (rate(chatflow_source_samples_total{{{RUN}}}[{WINDOW}]))"
    f" / ignoring (source) group_left sum(rate(chatflow_samples_total{{{RUN}}}[{WINDOW}]))",
    "{{source}} realised",
)
SCHEDULE_PROGRESS = Query(f"max(chatflow_schedule_progress_ratio{{{RUN}}})", "progress")
SCHEDULE_PHASE = Query(f"max(chatflow_schedule_phase{{{RUN}}})", "phase index")
SCHEDULE_PHASE_NAME = Query(f"max by (phase) (chatflow_schedule_phase_info{{{RUN}}})", "{{phase}}")

# --- data drawn ----------------------------------------------------------------------------------

SOURCE_SAMPLES = Query(f"max by (source) (chatflow_source_samples_total{{{RUN}}})", "{{source}}")
SOURCE_TOKENS = Query(f"max by (source) (chatflow_source_tokens_total{{{RUN}}})", "{{source}}")
SOURCE_EPOCHS = Query(f"max by (source) (chatflow_source_epochs{{{RUN}}})", "{{source}}")
# The global sample count: the report's x axis, matching `chatflow schedule --png`.
SAMPLES = Query(f"max(chatflow_samples_total{{{RUN}}})", "samples")
# The report's check that a run name, in any namespace, means one run.
SAMPLES_BY_NAMESPACE = Query(
    f"max by (namespace) (chatflow_samples_total{{{RUN}}})", "{{namespace}}"
)

# --- cross-lingual transfer ----------------------------------------------------------------------

HELDOUT_LOSS = Query(
    f"max by (source, language) (chatflow_heldout_loss{{{RUN}}})", "{{source}} ({{language}})"
)

# --- training ------------------------------------------------------------------------------------

LOSS = Query(f"max(chatflow_loss{{{RUN}}})", "loss")
LEARNING_RATE = Query(f"max(chatflow_learning_rate{{{RUN}}})", "learning rate")
TOKENS_PER_SECOND = Query(f"max(chatflow_tokens_per_second{{{RUN}}})", "tokens/s")
GRAD_NORM = Query(f"max(chatflow_grad_norm{{{RUN}}})", "gradient norm")
MFU = Query(f"max(chatflow_mfu_ratio{{{RUN}}})", "MFU")

# --- checkpoints ---------------------------------------------------------------------------------

STEP = Query(f"max(chatflow_step{{{RUN}}})", "step")
CHECKPOINTS = Query(f"max(chatflow_checkpoints_total{{{RUN}}})", "checkpoints")
LAST_CHECKPOINT_STEP = Query(f"max(chatflow_last_checkpoint_step{{{RUN}}})", "last checkpoint")
# Mean since the trainer process started: checkpoints are too rare for a rate window to hold one.
CHECKPOINT_SECONDS = Query(
    f"max(chatflow_checkpoint_duration_seconds_sum{{{RUN}}}"
    f" / chatflow_checkpoint_duration_seconds_count{{{RUN}}})",
    "mean seconds",
)

# --- health --------------------------------------------------------------------------------------

# The master pod of the run's job (`<run>-<digest>-master-0`, see the operator's render.py): `up`
# carries the target's labels only, not the trainer's `run`.
TRAINER_UP = Query(
    f'up{{job="{TRAINER_JOB}", namespace=~"$namespace", pod=~"($run)-[0-9a-f]{{8}}-master-0"}}',
    "{{pod}}",
)
SAMPLE_RATE = Query(f"sum(rate(chatflow_samples_total{{{RUN}}}[{WINDOW}]))", "samples/s")
OPERATOR_UP = Query(f'up{{job="{OPERATOR_JOB}"}}', "{{instance}}")
# The operator creates every trigger's error series at 0, so this is 0, not "no data", until the
# first error.
OPERATOR_ERRORS = Query(
    f"sum by (trigger) (rate(chatflow_operator_reconcile_errors_total[{WINDOW}]))",
    "{{trigger}}",
)
OPERATOR_RUNS = Query("sum by (phase) (chatflow_operator_runs)", "{{phase}}")

# --- alerts --------------------------------------------------------------------------------------

# The operator counts runs by phase but does not name them: `kubectl get chatflowruns -A` does.
RUN_FAILED = 'chatflow_operator_runs{phase="Failed"} > 0'
# No sample for 15 minutes while the trainer answers scrapes (a finished or deleted run's target is
# gone, so its `up` is absent). Checkpoints and evaluations pause training too: the alert's `for`
# leaves them time.
RUN_STALLED = "rate(chatflow_samples_total[15m]) == 0 and on (job, instance) up == 1"
# Step throughput (it leaves out evaluation and checkpoint time), smoothed over 10 minutes.
THROUGHPUT_DROPPED = (
    "avg_over_time(chatflow_tokens_per_second[10m])"
    " < 0.5 * avg_over_time(chatflow_tokens_per_second[1h])"
)
# A source past its first full pass is being repeated.
SOURCE_REPEATING = "chatflow_source_epochs >= 1"
# A source past 90% of its maxEpochs: the run fails when it passes the limit (RUN_FAILED). Sources
# without a limit have no chatflow_source_max_epochs series, so they never match.
SOURCE_NEAR_EPOCH_LIMIT = "chatflow_source_epochs / chatflow_source_max_epochs > 0.9"
# Held-out loss 5% above its best of the last 2 hours. As the mixture moves off a source (English,
# say), its loss rising is the forgetting that cross-lingual transfer should prevent.
HELDOUT_LOSS_RISING = "chatflow_heldout_loss > 1.05 * min_over_time(chatflow_heldout_loss[2h])"
