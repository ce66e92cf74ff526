"""Names of chatflow's Prometheus metrics, defined once.

The trainer (`train/metrics.py`) and `chatflow prepare` (`data/progress.py`) export them; the
PromQL of the dashboard, the alerts and `chatflow report` (`observability/queries.py`) and the
operator's status (`chatflow_operator/status.py`) read them by these names. Plain strings, so the
operator imports this module without the trainer's dependencies.

Conventions: every name starts with `chatflow_`, counters end in `_total`, durations are in
seconds (`_seconds`) and fractions in 0..1 end in `_ratio`.
"""

# --- the trainer (rank 0); labels: run, and for per-source series source, kind, language -------

SOURCE_LABELS = ("run", "source", "kind", "language")

SCHEDULE_PROGRESS = "chatflow_schedule_progress_ratio"  # fraction of the run done
SCHEDULE_PHASE = "chatflow_schedule_phase"  # index of the current phase
SCHEDULE_PHASE_INFO = "chatflow_schedule_phase_info"  # 1 for the current phase (label: phase)
MIXTURE_TARGET = "chatflow_mixture_target_ratio"  # scheduled weight of a source
MIXTURE_REALISED = "chatflow_mixture_realised_ratio"  # a source's share of the last step
SOURCE_SAMPLES = "chatflow_source_samples_total"
SOURCE_TOKENS = "chatflow_source_tokens_total"
SOURCE_EPOCHS = "chatflow_source_epochs"  # passes made over a source
SOURCE_MAX_EPOCHS = "chatflow_source_max_epochs"  # its maxEpochs; absent when unlimited
SAMPLES = "chatflow_samples_total"
TOKENS = "chatflow_tokens_total"
STEP = "chatflow_step"  # optimizer steps completed
LOSS = "chatflow_loss"
LEARNING_RATE = "chatflow_learning_rate"
GRAD_NORM = "chatflow_grad_norm"
SAMPLES_PER_SECOND = "chatflow_samples_per_second"
TOKENS_PER_SECOND = "chatflow_tokens_per_second"
MFU = "chatflow_mfu_ratio"
PRECISION_INFO = (
    "chatflow_precision_info"  # 1 for the precision trained in (labels: precision, reason)
)
CHECKPOINTS = "chatflow_checkpoints_total"
LAST_CHECKPOINT_STEP = "chatflow_last_checkpoint_step"
CHECKPOINT_DURATION = "chatflow_checkpoint_duration_seconds"  # a histogram
HELDOUT_LOSS = "chatflow_heldout_loss"
HELDOUT_PERPLEXITY = "chatflow_heldout_perplexity"

# --- the data preparation (`chatflow prepare`); labels: run, source ----------------------------

PREPARE_LABELS = ("run", "source")

PREPARE_DOCUMENTS = "chatflow_prepare_documents_total"  # documents tokenized
PREPARE_TOKENS = "chatflow_prepare_tokens_total"  # tokens written to packed blocks
PREPARE_READ_BYTES = "chatflow_prepare_read_bytes_total"  # input bytes read
PREPARE_SHARDS_DONE = "chatflow_prepare_shards_done"  # shards of the need written (gauge)
PREPARE_SHARDS_TOTAL = "chatflow_prepare_shards_total"  # shards needed; an estimate until read

# --- the operator; label: trigger (what started a reconcile pass) or phase ------------------------

OPERATOR_RECONCILES = "chatflow_operator_reconciles_total"
OPERATOR_RECONCILE_ERRORS = "chatflow_operator_reconcile_errors_total"
OPERATOR_RECONCILE_DURATION = "chatflow_operator_reconcile_duration_seconds"
OPERATOR_RUNS = "chatflow_operator_runs"  # runs watched, by phase (a gauge)

# --- NVIDIA's DCGM exporter (read, not exported): the GPUs of the run's pods -------------------
# With Kubernetes mapping on (the GPU operator's default) each series names the pod, namespace
# and container using the GPU; labels also gpu, UUID, device, modelName, Hostname.

DCGM_GPU_UTIL = "DCGM_FI_DEV_GPU_UTIL"  # % of time a kernel ran
DCGM_FB_USED = "DCGM_FI_DEV_FB_USED"  # framebuffer (GPU memory) used, MiB
DCGM_POWER = "DCGM_FI_DEV_POWER_USAGE"  # watts
DCGM_XID_ERRORS = "DCGM_FI_DEV_XID_ERRORS"  # the last XID error's code; 0: none
DCGM_TENSOR_ACTIVE = "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"  # tensor-core activity ratio (profiling)
