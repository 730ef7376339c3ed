"""Identity of the FineTuneJob API and the label/annotation keys the operator owns.

One place for these names: the CRD generator, the builders, the handlers, the
chart and the tests all import them from here.
"""

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
LIST_KIND = "FineTuneJobList"
CATEGORIES = ["kubetune"]

# Labels on every child object. `app.kubernetes.io/*` for humans and tools,
# `kubetune.io/*` for the operator's own lookups.
LABEL_JOB = f"{GROUP}/job"
LABEL_STAGE = f"{GROUP}/stage"
LABEL_GENERATION = f"{GROUP}/generation"  # the FineTuneJob generation a child was built from
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
MANAGED_BY = "kubetune-operator"

# Kueue admits a suspended Job carrying this label (Kueue's own constant).
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"

# Longest FineTuneJob name: child names append at most "-evaluate" (9
# characters) and pods of the Indexed train Job need "<job>-train-<index>-<5
# random>" to stay within the 63-character DNS label of a pod hostname.
MAX_NAME_LENGTH = 40
