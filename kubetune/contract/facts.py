"""Names the operator, the trainer, the chart and the tests share, each defined once.

Imports nothing: the trainer, the operator, the CRD generator and the pods'
entry points all read these.
"""

# ---------------------------------------------------------------- API identity
GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
LIST_KIND = "FineTuneJobList"
CATEGORIES = ["kubetune"]

# Longest FineTuneJob name: child names append at most "-evaluate" (9
# characters) and pods of the Indexed train Job need "<job>-train-<index>-<5
# random>" to stay within the 63-character DNS label of a pod hostname.
MAX_NAME_LENGTH = 40

# ---------------------------------------------------------------- labels and annotations
# `app.kubernetes.io/*` for humans and tools, `kubetune.io/*` for the operator's own lookups.
LABEL_JOB = f"{GROUP}/job"
LABEL_STAGE = f"{GROUP}/stage"
LABEL_GENERATION = f"{GROUP}/generation"  # the FineTuneJob generation a child was built from
LABEL_REVISION = f"{GROUP}/revision"  # the content-addressed revision a per-revision child belongs to
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
MANAGED_BY = "kubetune-operator"
# Kueue admits a suspended Job carrying this label (Kueue's own constants).
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
LABEL_KUEUE_PRIORITY = "kueue.x-k8s.io/priority-class"  # a WorkloadPriorityClass
# Indexed Job pods carry their completion index here (Kubernetes' own constant).
ANNOTATION_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"

# ---------------------------------------------------------------- pods
# Where every stage pod finds its trainer config (the `<job>-config` ConfigMap).
CONFIG_DIR = "/etc/kubetune"
CONFIG_FILE = "trainer.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
DEEPSPEED_FILE = "deepspeed.json"
# The stage's JSON verdict (docs/contracts.md "Pod -> operator").
TERMINATION_LOG_PATH = "/dev/termination-log"
CACHE_DIR = "/var/cache/kubetune"

# ---------------------------------------------------------------- env vars
ENV_JOB_NAME = "KUBETUNE_JOB_NAME"  # the FineTuneJob whose status the trainer patches
ENV_JOB_NAMESPACE = "KUBETUNE_JOB_NAMESPACE"
ENV_CACHE_DIR = "KUBETUNE_CACHE_DIR"
ENV_TERMINATION_LOG = "KUBETUNE_TERMINATION_LOG"  # overrides TERMINATION_LOG_PATH (local runs, tests)
# Debugging and benchmark overrides of `training.performance` (the spec is the
# normal way; an override set in the environment wins over it).
ENV_ATTENTION = "KUBETUNE_ATTENTION"
ENV_LIGER = "KUBETUNE_LIGER"
ENV_FUSED_LORA = "KUBETUNE_FUSED_LORA"
ENV_FP8 = "KUBETUNE_FP8"
# With FP8, on unless set to 0: the SwiGLU product quantised where it is made, for a frozen
# down_proj (trainer/lora_kernels.swiglu_down_fp8, frozen_swiglu_mlp_fp8).
ENV_FP8_SWIGLU = "KUBETUNE_FP8_SWIGLU"
# With FP8, on unless set to 0: the forward products accumulate without cuBLASLt's fp32
# promotion (trainer/fp8.set_fast_accum).
ENV_FP8_FAST_ACCUM = "KUBETUNE_FP8_FAST_ACCUM"
# With FP8, on unless set to 0: the input gradients' products accumulate so too.
ENV_FP8_FAST_ACCUM_GRAD = "KUBETUNE_FP8_FAST_ACCUM_GRAD"
# On unless set to 0: the trainer keeps its host from waiting for the device where
# transformers and TRL would (sft.LabelRows, packed_attention.without_packed_scan).
ENV_AVOID_HOST_WAITS = "KUBETUNE_AVOID_HOST_WAITS"
ENV_COMPILE = "KUBETUNE_COMPILE"
ENV_SELECTIVE_CHECKPOINTING = "KUBETUNE_SELECTIVE_CHECKPOINTING"
ENV_MEMORY_BUDGET_GIB = "KUBETUNE_MEMORY_BUDGET_GIB"
# On unless set to 0: a child process compiles the run's Triton kernels while the trainer
# imports and loads (trainer/kernel_warmup.py).
ENV_KERNEL_WARMUP = "KUBETUNE_KERNEL_WARMUP"

# ---------------------------------------------------------------- artifact layout under output.uri
# A prefix exists for readers only once its MANIFEST.json (written last) does.
MANIFEST = "MANIFEST.json"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
MERGED = "merged"
VALIDATION = "validation"
EVALUATION = "evaluation"
REPORT = "report.json"
VALIDATION_REPORT = f"{VALIDATION}/{REPORT}"
EVALUATION_REPORT = f"{EVALUATION}/{REPORT}"
METRICS_FILE = "metrics.jsonl"  # inside adapter/
LOSS_CURVE_FILE = "loss_curve.png"  # inside adapter/
TENSORBOARD_DIR = "tensorboard"  # inside adapter/
# Beside the revisions, shared by them all: compiled GPU kernels kept between the job's pods
# (trainer/kernel_cache.py), one archive per GPU kind and library versions.
KERNEL_CACHE = "kernel-cache"
