"""The training recipe, defined once.

These sections are both the FineTuneJob's `spec.baseModel`, `spec.dataset`,
`spec.method`, `spec.training` and `spec.evaluation` (the CRD is generated from
them, descriptions included: `kubectl explain ftj.spec.training.optimizer`) and
the same sections of the trainer's config file (`trainer/config.py`). The API
only narrows what a cluster accepts (URIs must be s3:// there, a local run may
also read a directory), the way TRL's SFTConfig extends TrainingArguments.

Pydantic and the standard library only: the operator imports this module, and
it must not pull torch into the operator's process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Optional, Union

from pydantic import Field

from .rules import ApiModel, Rule

DatasetFormat = Literal["auto", "alpaca", "sharegpt", "messages", "prompt-completion", "text"]
OverLength = Literal["truncate", "drop"]
MethodType = Literal["lora", "qlora"]
Scheduler = Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"]
Strategy = Literal["ddp", "deepspeed-zero2", "deepspeed-zero3"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
# auto: the trainer decides from the hardware and the recipe (documented per field).
Toggle = Literal["auto", "on", "off"]
Attention = Literal["auto", "varlen", "sdpa", "eager"]
# transformers' `optim` names. auto: adamw_torch_fused on a GPU, adamw_torch on a CPU
# (TrainingArguments' own default). The 8-bit and paged ones are bitsandbytes' (CUDA only).
Optimizer = Literal[
    "auto", "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
    "adafactor", "sgd",
]
CUDA_ONLY_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
LoraBias = Literal["none", "all", "lora_only"]
ComputeDtype = Literal["bfloat16", "float16"]

ModuleName = Annotated[str, Field(min_length=1, max_length=128)]


class BaseModelSpec(ApiModel):
    """The model to fine-tune."""

    uri: str = Field(min_length=1, max_length=1024,
                     description="s3://bucket/prefix/ of a Hugging Face model directory (a local directory for a local run).")
    revision: Optional[str] = Field(default=None, max_length=128, description="Revision (branch, tag or commit) of a Hugging Face id.")
    name: Optional[str] = Field(
        default=None,
        max_length=128,
        description="Name the base model is known by (adapter metadata, vLLM); defaults to the last segment of uri.",
    )

    @property
    def served_name(self) -> str:
        if self.name:
            return self.name
        tail = self.uri.rstrip("/").rsplit("/", 1)[-1]
        return tail or self.uri


class DatasetSpec(ApiModel):
    """Training data: one file."""

    uri: str = Field(min_length=1, max_length=1024,
                     description="s3://bucket/key of a .jsonl, .json, .parquet or .csv file (a local file for a local run).")
    format: DatasetFormat = Field(default="auto", description="Row format; auto detects it from the first rows.")
    validation_split: float = Field(default=0.05, ge=0.0, lt=1.0, description="Fraction of rows held out for eval loss.")
    max_length: int = Field(default=2048, ge=16, le=1_048_576, description="Maximum tokens per training example.")
    over_length: OverLength = Field(default="truncate", description="What to do with longer examples: truncate or drop.")
    chat_template: Optional[str] = Field(
        default=None,
        min_length=1,
        max_length=65536,
        description="Chat template that replaces the tokenizer's own for conversation data (alpaca, sharegpt, "
        "messages); needed when the base model has none. Either inline Jinja, or the name of a template TRL "
        "ships (llama3, qwen2_5, qwen3, gemma, gemma3, phi3, phi3_5, ...). With completionOnlyLoss the template "
        "needs {% generation %} blocks around the assistant's replies; TRL's training version is used for the "
        "templates it knows.",
    )
    duplicates: Literal["warn", "drop", "error"] = Field(
        default="warn",
        description="Rows identical to an earlier row: warn (keep them, reported with counts), drop (keep the "
        "first copy only, reported) or error (each later copy is a bad row). Copies always share a split.",
    )


class QuantizationSpec(ApiModel):
    """bitsandbytes quantization of the frozen base weights (qlora only)."""

    bits: Literal[4, 8] = Field(default=4, description="4 or 8 bit base weights.")
    type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type.")
    double_quant: bool = Field(default=True, description="Quantize the quantization constants too.")
    compute_dtype: ComputeDtype = Field(default="bfloat16", description="Dtype the 4-bit weights are dequantized to for products.")


class MethodSpec(ApiModel):
    """Parameter-efficient fine-tuning method (PEFT LoRA)."""

    type: MethodType = Field(default="qlora", description="qlora (4/8-bit base + LoRA) or lora (bf16 base + LoRA).")
    r: int = Field(default=16, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(default=32, gt=0, le=4096, description="LoRA alpha (scaling = alpha / r, or alpha / sqrt(r) with useRslora).")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[ModuleName] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        max_length=64,
        description="Module names to adapt, or [all-linear] for every linear layer but the output head.",
    )
    bias: LoraBias = Field(default="none", description="Which biases train: none, all, or lora_only (those of adapted layers).")
    use_dora: bool = Field(default=False, description="DoRA: weight-decomposed LoRA (magnitude and direction trained apart).")
    use_rslora: bool = Field(default=False, description="rsLoRA: scale by alpha / sqrt(r), which keeps high ranks stable.")
    modules_to_save: list[ModuleName] = Field(
        default_factory=list,
        max_length=16,
        description="Modules trained in full and saved with the adapter, e.g. [lm_head, embed_tokens] after adding tokens.",
    )
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec, description="Used when type is qlora.")

    @property
    def peft_target_modules(self) -> Union[str, list[str]]:
        """What PEFT's LoraConfig takes: the string 'all-linear' or a list of names."""
        return "all-linear" if self.target_modules == ["all-linear"] else list(self.target_modules)


class PerformanceSpec(ApiModel):
    """How the trainer runs on a GPU. Every setting changes speed and memory, never what is learned
    beyond rounding; auto is the measured best (bench/RESULTS.md). The KUBETUNE_* environment
    variables of the same names override these, for debugging and benchmarks."""

    attention: Attention = Field(
        default="auto",
        description="Attention kernel. auto: varlen (packed rows without a quadratic mask) on CUDA GPUs where "
        "the family's attention allows it; sdpa for families with a sliding window narrower than dataset.maxLength; "
        "eager for soft-capped families (Gemma 2); eager: the library's reference implementation.",
    )
    liger: Toggle = Field(default="auto", description="Liger kernels (RMSNorm, RoPE, SwiGLU). auto: on CUDA GPUs when installed.")
    fused_lora: Toggle = Field(
        default="auto",
        description="Each LoRA linear as one fused autograd node. auto: on GPUs, off under DeepSpeed ZeRO-3 "
        "and for DoRA layers."
    )
    fp8: Toggle = Field(
        default="auto",
        description="FP8 products of the frozen base weights (adapters, attention and loss stay bf16). "
        "auto: on for qlora on GPUs with FP8 tensor cores (H100, H200, L4, L40S), off for lora.",
    )
    compile: Toggle = Field(
        default="auto", description="torch.compile of each decoder layer. auto: off (fails under activation checkpointing)."
    )
    selective_checkpointing: Toggle = Field(
        default="auto",
        description="Leave the last layers uncheckpointed in the memory the micro-batch leaves over. auto: on, off under ZeRO-3.",
    )
    memory_budget_gib: Optional[float] = Field(
        default=None,
        alias="memoryBudgetGiB",
        gt=0,
        le=4096,
        description="GPU memory (GiB) the automatic micro-batch may plan for; unset: 90% of the device.",
    )


class TrainingSpec(ApiModel):
    """Optimizer, schedule, logging and checkpointing."""

    __rules__ = (
        Rule(
            # has(): the API server also checks this rule against the section's default ({}).
            cel="!has(self.batchSize) || (type(self.batchSize) == int ? self.batchSize >= 1 : self.batchSize == 'auto')",
            message="batchSize must be 'auto' or an integer >= 1",
            field_path=".batchSize",
            check=lambda t: t.batch_size == "auto" or (isinstance(t.batch_size, int) and t.batch_size >= 1),
        ),
    )

    epochs: float = Field(default=3, gt=0, le=1000, description="Passes over the training split.")
    max_steps: Optional[int] = Field(default=None, ge=1, description="Optimizer steps; overrides epochs when set.")
    learning_rate: float = Field(default=2e-4, gt=0, lt=1, description="Peak learning rate.")
    scheduler: Scheduler = Field(default="cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(default=0.05, ge=0.0, lt=1.0, description="Fraction of steps spent warming up.")
    optimizer: Optimizer = Field(
        default="auto",
        description="Optimizer (transformers' names). auto: adamw_torch_fused on GPUs, adamw_torch on CPUs; "
        "adamw_8bit and the paged ones (bitsandbytes) need a CUDA GPU.",
    )
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0, description="Decoupled weight decay of the trained parameters.")
    max_grad_norm: float = Field(default=1.0, ge=0.0, le=1000.0, description="Gradient clipping norm; 0 turns clipping off.")
    batch_size: Union[int, Literal["auto"]] = Field(
        default="auto",
        description="Per-device micro batch size, or auto (largest that fits).",
        json_schema_extra={"x-kubernetes-int-or-string": True},
    )
    gradient_accumulation: int = Field(default=1, ge=1, le=1024, description="Micro batches per optimizer step.")
    packing: bool = Field(default=True, description="Pack short examples into full-length rows (no attention across examples).")
    completion_only_loss: bool = Field(
        default=True,
        description="Loss on completions and assistant turns only; false trains on prompts and user turns too.",
    )
    seed: int = Field(default=42, ge=0, le=2**32 - 1, description="Random seed (data order, LoRA init).")
    checkpoint_every: int = Field(default=200, ge=1, description="Steps between checkpoints written to S3.")
    keep_checkpoints: int = Field(default=3, ge=1, le=100, description="Complete checkpoints kept in S3; older ones are deleted.")
    eval_every: Optional[int] = Field(default=None, ge=1, description="Steps between held-out loss passes; unset: with every checkpoint.")
    log_every: int = Field(default=1, ge=1, le=10000, description="Steps between progress records (metrics.jsonl, status).")
    gradient_checkpointing: bool = Field(
        default=True, description="Trade compute for activation memory (with batchSize auto the memory plan may turn it on anyway)."
    )
    precision: Precision = Field(default="auto", description="auto: bf16 on GPUs that support it, fp32 on CPUs.")
    performance: PerformanceSpec = Field(default_factory=PerformanceSpec, description="Kernels and memory plan (GPU only).")


class EvaluationSpec(ApiModel):
    """Held-out loss before vs after, sample generations, optional gate."""

    enabled: bool = Field(default=True, description="Run the evaluate stage.")
    prompts: list[Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=list, max_length=32, description="Prompts whose generations are stored in the report."
    )
    max_new_tokens: int = Field(default=64, ge=1, le=4096, description="Tokens generated per prompt.")
    max_eval_rows: int = Field(default=512, ge=1, le=1_000_000, description="Held-out rows scored (the first ones of the split).")
    min_improvement: Optional[float] = Field(
        default=None,
        ge=-1.0,
        le=1.0,
        description="Gate: minimum relative drop of held-out loss, (base - tuned) / base, for the model to be served. "
        "Unset: the gate passes whenever evaluation succeeds.",
    )


# Recipe fields that change how a run goes (speed, bookkeeping) but not what it
# produces: an edit of these alone keeps the revision (and its artifacts).
RUN_ONLY_FIELDS: frozenset[tuple[str, ...]] = frozenset({
    ("training", "performance"),
    ("training", "checkpoint_every"),
    ("training", "keep_checkpoints"),
    ("training", "log_every"),
    ("training", "eval_every"),
})


# ---------------------------------------------------------------- invariants across sections
# Stated once: the API turns each into a CEL rule of the spec (where the strategy is
# resources.strategy), the trainer config checks the same predicate (launch.strategy).


@dataclass(frozen=True)
class RecipeRule:
    field: str  # the recipe field at fault, relative to the spec / the config
    message: str
    # (method, training, strategy) -> True when the combination can run
    check: Callable[[MethodSpec, TrainingSpec, str], bool]
    # CEL over the spec, with {strategy} standing for the strategy's path
    cel: str


    def api_rule(self, strategy_path: str) -> Rule:
        return Rule(
            cel=self.cel.format(strategy=strategy_path),
            message=self.message,
            field_path=f".{self.field}",
            check=lambda s: self.check(s.method, s.training, s.resources.strategy),
        )


RECIPE_RULES = (
    RecipeRule(
        # 4-bit weights are stored in bf16 tensors, which ZeRO-3 partitions like any other;
        # bitsandbytes' 8-bit weights cannot be partitioned.
        field="method.quantization.bits",
        message="8-bit qlora (method.quantization.bits: 8) cannot be combined with strategy deepspeed-zero3; "
        "use 4-bit or deepspeed-zero2",
        check=lambda m, t, s: not (m.type == "qlora" and m.quantization.bits == 8 and s == "deepspeed-zero3"),
        cel="!(self.method.type == 'qlora' && has(self.method.quantization) && has(self.method.quantization.bits)"
        " && self.method.quantization.bits == 8 && {strategy} == 'deepspeed-zero3')",
    ),
    RecipeRule(
        # The FP8 backward re-reads the base weight outside the module hooks that gather it.
        field="training.performance.fp8",
        message="training.performance.fp8: on cannot be combined with strategy deepspeed-zero3; "
        "use fp8: auto (bf16 under ZeRO-3) or deepspeed-zero2",
        check=lambda m, t, s: not (t.performance.fp8 == "on" and s == "deepspeed-zero3"),
        cel="!(has(self.training.performance) && has(self.training.performance.fp8)"
        " && self.training.performance.fp8 == 'on' && {strategy} == 'deepspeed-zero3')",
    ),
    RecipeRule(
        # The fused LoRA node reads the base weight directly, outside ZeRO-3's gather hooks.
        field="training.performance.fusedLora",
        message="training.performance.fusedLora: on cannot be combined with strategy deepspeed-zero3; use auto or off",
        check=lambda m, t, s: not (t.performance.fused_lora == "on" and s == "deepspeed-zero3"),
        cel="!(has(self.training.performance) && has(self.training.performance.fusedLora)"
        " && self.training.performance.fusedLora == 'on' && {strategy} == 'deepspeed-zero3')",
    ),
    RecipeRule(
        # DoRA layers scale by a weight norm the fused node does not compute; they keep PEFT's forward.
        field="training.performance.fusedLora",
        message="training.performance.fusedLora: on cannot be combined with method.useDora: true; use auto",
        check=lambda m, t, s: not (t.performance.fused_lora == "on" and m.use_dora),
        cel="!(has(self.training.performance) && has(self.training.performance.fusedLora)"
        " && self.training.performance.fusedLora == 'on' && has(self.method.useDora) && self.method.useDora)",
    ),
)


def recipe_errors(method: MethodSpec, training: TrainingSpec, strategy: str) -> list[str]:
    """Messages of every RECIPE_RULES rule the combination breaks."""
    return [r.message for r in RECIPE_RULES if not r.check(method, training, strategy)]


def defaults_of(model: type[ApiModel]) -> dict[str, Any]:
    """{field: default} of a section, for tests and docs (one place the defaults live)."""
    return {name: f.get_default(call_default_factory=True) for name, f in model.model_fields.items() if not f.is_required()}
