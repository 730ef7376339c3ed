"""The train stage: LoRA / QLoRA supervised fine-tuning with TRL's SFTTrainer.

Run as `kubetune train --config x.yaml`, directly or under `accelerate launch`
(1..N processes and machines; DDP or DeepSpeed ZeRO-2/3). S3 is the source of
truth: a (re)started run resumes from the newest manifested checkpoint under
output.uri, and the local run directory is scratch space.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from kubetune.contract.facts import LOSS_CURVE_FILE, METRICS_FILE, TENSORBOARD_DIR
from kubetune.contract.recipe import CUDA_ONLY_OPTIMIZERS
from kubetune.trainer import artifacts, kernel_warmup
from kubetune.trainer.config import TrainerConfig
from kubetune.trainer.deepspeed import deepspeed_config as deepspeed_strategy_config
from kubetune.trainer.deepspeed import zero3_enabled
from kubetune.trainer.storage import cache_root

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 143  # 128 + SIGTERM: what Kubernetes expects from a pod that stopped on its signal
CPU_BATCH_SIZE = 4
GPU_BATCH_SIZE = 8


class TrainingError(RuntimeError):
    """A configuration that cannot train here; the message says which field and why."""


@dataclass
class TrainResult:
    exit_code: int
    global_step: int
    adapter_uri: Optional[str] = None
    eval_loss: Optional[float] = None
    stopped_by_signal: bool = False
    is_main: bool = True  # only the main process speaks for the run (termination message, summary)


# ---------------------------------------------------------------- pure helpers


def resolve_precision(cfg: TrainerConfig, cuda: bool, bf16_supported: bool) -> str:
    p = cfg.training.precision
    if p == "auto":
        return "bf16" if cuda and bf16_supported else "fp32"
    if p in ("bf16", "fp16") and not cuda:
        raise TrainingError(f"training.precision={p} needs a CUDA GPU; use 'auto' or 'fp32' on CPU")
    return p


def resolve_performance(cfg: TrainerConfig, *, cuda: bool, local_rank: int = 0, model_config: Any = None,
                        liger_found: Optional[bool] = None):
    """training.performance on this machine (`performance.resolve`, which holds the rules);
    a setting that cannot be honoured here is a TrainingError naming the field. `liger_found`:
    whether liger-kernel is installed, when the caller knows it without importing it (its
    import brings torch's compiler stack and peft: `kernel_warmup`)."""
    import torch

    from kubetune.trainer import fp8, performance
    from kubetune.trainer.fast_paths import liger_installed
    from kubetune.trainer.packed_attention import varlen_available

    try:
        return performance.resolve(
            cfg.training.performance, method=cfg.method, strategy=cfg.launch.strategy, cuda=cuda,
            fp8_capable=cuda and fp8.supported(torch.device("cuda", local_rank)),
            varlen_capable=cuda and varlen_available(), liger_installed=cuda and (liger_installed() if liger_found is None else liger_found),
            model_config=model_config, max_length=cfg.dataset.max_length)
    except performance.PerformanceError as e:
        raise TrainingError(str(e)) from None


def check_method_supported(cfg: TrainerConfig, cuda: bool) -> None:
    if cfg.method.type == "qlora" and not cuda:
        raise TrainingError(
            "method.type=qlora needs a CUDA GPU (bitsandbytes 4-bit weights); this machine has none. "
            "Use method.type=lora to train on CPU."
        )
    if cfg.launch.strategy.startswith("deepspeed") and not cuda:
        raise TrainingError(f"resources.strategy={cfg.launch.strategy} needs CUDA GPUs; use 'ddp' on CPU")
    if cfg.training.optimizer in CUDA_ONLY_OPTIMIZERS and not cuda:
        raise TrainingError(f"training.optimizer={cfg.training.optimizer} needs a CUDA GPU (bitsandbytes); "
                            "use 'auto', 'adamw_torch' or 'adafactor' on CPU")


def deepspeed_config(cfg: TrainerConfig) -> Optional[dict[str, Any]]:
    """The DeepSpeed config for the strategy (None for DDP)."""
    return deepspeed_strategy_config(cfg.launch.strategy)


def sft_arguments(cfg: TrainerConfig, output_dir: Path, *, cuda: bool, precision: str, has_eval: bool) -> dict[str, Any]:
    """Pure: keyword arguments for trl.SFTConfig."""
    t = cfg.training
    batch = t.batch_size if isinstance(t.batch_size, int) else (GPU_BATCH_SIZE if cuda else CPU_BATCH_SIZE)
    eval_every = t.eval_every or t.checkpoint_every
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=batch,
        auto_find_batch_size=cuda and t.batch_size == "auto",
        gradient_accumulation_steps=t.gradient_accumulation,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        gradient_checkpointing=t.gradient_checkpointing,
        # Non-reentrant: works with the frozen embeddings of a PEFT model (no inputs that require grad).
        gradient_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        seed=t.seed,
        data_seed=t.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not cuda,
        logging_steps=t.log_every,
        save_strategy="steps",
        save_steps=t.checkpoint_every,
        save_total_limit=2,  # local scratch only; S3 keeps training.keepCheckpoints
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_every if has_eval else None,
        report_to="none",  # metrics go through ProgressReporter (metrics.jsonl, TensorBoard, status)
        disable_tqdm=True,
        include_num_input_tokens_seen="no",  # callbacks.CountTokens counts without a sync per micro-batch
        dataloader_pin_memory=cuda,
        # Pinned batches copied to the GPU without waiting: a blocking copy makes the host wait for
        # the previous step's optimizer at every step's first batch, idling the GPU while it catches up.
        accelerator_config={"non_blocking": cuda},
        max_length=cfg.dataset.max_length,
        packing=t.packing,
        packing_strategy="bfd",  # padding-free: position_ids restart per sample, no cross-sample attention
        ddp_find_unused_parameters=False,
    )
    if t.optimizer != "auto":  # auto: TrainingArguments' own choice (fused AdamW on GPUs)
        kwargs["optim"] = t.optimizer
    ds = deepspeed_config(cfg)
    # Under `accelerate launch --use_deepspeed --deepspeed_config_file ...` (how the operator starts
    # training) the launcher's config is the one in force; ours is only for a bare `kubetune train`.
    if ds is not None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        kwargs["deepspeed"] = ds
    return kwargs


def lora_config(cfg: TrainerConfig):
    from peft import LoraConfig

    m = cfg.method
    return LoraConfig(r=m.r, lora_alpha=m.alpha, lora_dropout=m.dropout, target_modules=m.peft_target_modules,
                      bias=m.bias, use_dora=m.use_dora, use_rslora=m.use_rslora,
                      modules_to_save=list(m.modules_to_save) or None, task_type="CAUSAL_LM")


def run_dir_for(cfg: TrainerConfig) -> Path:
    key = hashlib.sha256(cfg.output.uri.encode()).hexdigest()[:16]
    return cache_root(cfg.storage.cache_dir) / "runs" / key


# ---------------------------------------------------------------- model


def model_load_kwargs(cfg: TrainerConfig, *, cuda: bool, precision: str, local_rank: int, attn: str) -> dict[str, Any]:
    """Keyword arguments for `from_pretrained` (pure apart from building the quantization config)."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn}
    zero3 = zero3_enabled(cfg.launch.strategy)
    if cfg.method.type == "qlora":
        from transformers import BitsAndBytesConfig

        q = cfg.method.quantization
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=q.bits == 4, load_in_8bit=q.bits == 8, bnb_4bit_quant_type=q.type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
            # ZeRO-3 partitions parameters of one floating dtype: packed 4-bit weights stored in
            # bf16 tensors (instead of uint8) are partitioned, gathered and freed like the rest.
            bnb_4bit_quant_storage=dtype if zero3 else torch.uint8,
        )
        kwargs["device_map"] = {"": local_rank}  # bitsandbytes quantizes on the GPU, also under ZeRO-3
    elif cuda and not zero3:
        # Straight onto this rank's GPU: the fast paths (Liger, fused LoRA) and the micro-batch
        # planner look at the model where it is (a bf16 model left on the CPU got none of them:
        # 12.3k instead of 16.2k tokens/s, bench/RESULTS.md). Under ZeRO-3 DeepSpeed places
        # and partitions the weights itself.
        kwargs["device_map"] = {"": local_rank}
    return kwargs


def load_model(cfg: TrainerConfig, model_dir: Path, *, cuda: bool, precision: str, local_rank: int):
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM

    from kubetune.trainer.fast_paths import apply_fast_paths
    from kubetune.trainer.packed_attention import attention_implementation

    # Before the load: a performance setting that cannot be honoured fails in seconds, not
    # after it. The model's config says whether the varlen kernel reproduces its attention.
    perf = resolve_performance(cfg, cuda=cuda, local_rank=local_rank, model_config=AutoConfig.from_pretrained(str(model_dir)))
    log.info("training.performance: %s", perf.describe())
    if perf.overrides:  # a debugging knob left set must not pass unnoticed: it wins over the job's spec
        log.warning("training.performance overridden by the environment: %s", " ".join(perf.overrides))
    kwargs = model_load_kwargs(cfg, cuda=cuda, precision=precision, local_rank=local_rank,
                               attn=attention_implementation(perf.attention, skip_packed_scan=perf.avoid_host_waits))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    if cfg.method.type == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.training.gradient_checkpointing)
    model = get_peft_model(model, lora_config(cfg))
    apply_fast_paths(model, perf)  # after PEFT: it fuses the LoRA layers
    return model


def check_adapter_complete(adapter_dir: Path) -> None:
    """Refuse to publish an adapter with empty tensors (ungathered ZeRO-3/FSDP shards)."""
    from safetensors import safe_open

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise RuntimeError(f"no adapter_model.safetensors in {adapter_dir}")
    with safe_open(str(path), framework="pt") as f:
        empty = [k for k in f.keys() if 0 in f.get_slice(k).get_shape()]
    if empty:
        raise RuntimeError(f"adapter has {len(empty)} empty tensors (e.g. {empty[0]}): shards were not gathered")


def set_adapter_base_name(adapter_dir: Path, served_name: str) -> None:
    """vLLM only loads an adapter whose base_model_name_or_path equals the served model's name."""
    path = adapter_dir / "adapter_config.json"
    conf = json.loads(path.read_text())
    conf["base_model_name_or_path"] = served_name
    path.write_text(json.dumps(conf, indent=2))


# ---------------------------------------------------------------- the stage


def run_train(cfg: TrainerConfig) -> TrainResult:
    from kubetune.trainer.callbacks import GracefulStop

    stop = GracefulStop().install()  # first thing: a SIGTERM during setup still ends in a clean exit
    try:
        return _train(cfg, stop)
    finally:
        stop.uninstall()


def _train(cfg: TrainerConfig, stop) -> TrainResult:
    from kubetune.trainer.callbacks import (EXTRAS_DIR, CountTokens, ReportProgress, SaveKernelCache, SelectiveCheckpointing,
                                            StopOnSignal, UploadCheckpoints)

    import torch
    from accelerate import PartialState

    from kubetune.trainer.dataset import dataset_path, prepare, to_hf_dataset
    from kubetune.trainer.kubestatus import StatusPatcher, job_from_env
    from kubetune.trainer.modelio import base_model_dir, load_tokenizer, output_store
    from kubetune.trainer.progress import ProgressReporter, plot_loss_curve, read_metrics, truncate_metrics

    cuda = torch.cuda.is_available()
    check_method_supported(cfg, cuda)
    precision = resolve_precision(cfg, cuda, cuda and torch.cuda.is_bf16_supported())
    state = PartialState(cpu=not cuda)
    store = output_store(cfg)
    run_dir = run_dir_for(cfg)
    hf_dir = run_dir / "hf"
    # Before any download or barrier: every rank reads the same manifest and, for a checkpoint of
    # another run (artifacts.check_checkpoint_run), fails alike with the changed fields named.
    resume_step = artifacts.latest_checkpoint(store)
    if resume_step is not None:
        unchecked = artifacts.check_checkpoint_run(store, resume_step, cfg)
        if unchecked and state.is_main_process:
            print(unchecked, flush=True)

    with state.local_main_process_first():
        if state.is_local_main_process:
            shutil.rmtree(run_dir, ignore_errors=True)  # scratch; S3 holds the truth
            run_dir.mkdir(parents=True)
        # The local main process downloads; the others then find the ETag-keyed cache complete.
        model_dir = base_model_dir(cfg)
        data_file = dataset_path(cfg)
        resume_dir = None
        if resume_step is not None:
            resume_dir = hf_dir / f"checkpoint-{resume_step}"
            if state.is_local_main_process:
                artifacts.fetch_dir(store, artifacts.checkpoint_prefix(resume_step), resume_dir)
    if resume_dir is not None and state.is_main_process:
        extras = resume_dir / EXTRAS_DIR
        if (extras / METRICS_FILE).exists():
            shutil.copyfile(extras / METRICS_FILE, run_dir / METRICS_FILE)
            truncate_metrics(run_dir / METRICS_FILE, resume_step)
        if (extras / TENSORBOARD_DIR).is_dir():
            shutil.copytree(extras / TENSORBOARD_DIR, run_dir / TENSORBOARD_DIR, dirs_exist_ok=True)
        print(f"resuming from {store.uri.rstrip('/')}/{artifacts.checkpoint_prefix(resume_step)}/", flush=True)

    tokenizer = load_tokenizer(model_dir)
    from concurrent.futures import ThreadPoolExecutor

    from trl import SFTConfig

    from kubetune.trainer.sft import sft_trainer_class

    from transformers import set_seed

    # Before the adapter exists: LoRA's A matrices are drawn from the global RNG, and training.seed
    # promises the same initial adapter (and so the same run) every time. The data is read and
    # tokenized, and turned into the Trainer's datasets, on a thread while the model loads (reading
    # and quantising mostly release the GIL; the data's shuffle has its own seeded generator), so
    # the start pays the longer of the two.
    set_seed(cfg.training.seed)

    def read_data():
        data = prepare(cfg, tokenizer, data_file)
        if not data.ok:
            return data, None, None
        return data, to_hf_dataset(data.train), to_hf_dataset(data.validation) if data.validation else None

    # One pod per node fetches the job's compiled kernels meanwhile (kernel_cache.py): the first
    # step then finds them instead of compiling them.
    kernels = None
    if cfg.output.kernel_cache_uri and cuda and state.is_local_main_process:
        from kubetune.trainer.kernel_cache import KernelCache

        kernels = KernelCache.for_this_gpu(cfg.output.kernel_cache_uri, cfg.storage)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="kubetune-data") as pool:
        pending = pool.submit(read_data)
        restored = pool.submit(kernels.restore) if kernels is not None else None
        model = load_model(cfg, model_dir, cuda=cuda, precision=precision, local_rank=state.local_process_index)
        data, train_ds, eval_ds = pending.result()
        if restored is not None and restored.result():
            kernel_warmup.cancel()  # the job's kernels are here: nothing left for the warm-up to compile
    if cfg.output.kernel_cache_uri and cuda and state.num_processes > 1:
        state.wait_for_everyone()  # the node's other ranks start their first step with the kernels in place too
    if not data.ok:
        raise TrainingError(f"dataset {cfg.dataset.uri}: {data.problem()} (run validate)")

    if stop.agreed():  # SIGTERM while downloading or loading: nothing trained, nothing to save
        print("stopped on SIGTERM before training started", flush=True)
        return TrainResult(EXIT_PREEMPTED, resume_step or 0, stopped_by_signal=True, is_main=state.is_main_process)
    sft_kwargs = sft_arguments(cfg, hf_dir, cuda=cuda, precision=precision, has_eval=eval_ds is not None)
    layer_choices = None
    perf = resolve_performance(cfg, cuda=cuda, local_rank=state.local_process_index)
    if cuda:
        from kubetune.trainer.memory_plan import tune_sft_arguments

        # micro-batch and (selective) checkpointing for this GPU's memory, within training.performance
        sft_kwargs, layer_choices = tune_sft_arguments(sft_kwargs, model, cfg, perf)
    args = SFTConfig(**sft_kwargs)

    reporter = None
    if state.is_main_process:
        job = job_from_env(cfg.job.name, cfg.job.namespace)
        reporter = ProgressReporter(run_dir / METRICS_FILE, run_dir / TENSORBOARD_DIR,
                                    StatusPatcher(*job) if job else None)
    stop_cb = StopOnSignal(stop)
    # CountTokens after StopOnSignal (it reads should_training_stop) and before the reporters.
    tokens = CountTokens()
    callbacks = [stop_cb, tokens, UploadCheckpoints(store, run_dir, reporter, cfg.training.keep_checkpoints, state.is_main_process,
                                                     run=artifacts.run_record(cfg))]
    if layer_choices is not None and (layer_choices.uncheckpointed or layer_choices.kept_attention):
        callbacks.append(SelectiveCheckpointing(layer_choices,
                                                tokens=args.per_device_train_batch_size * cfg.dataset.max_length))
    if reporter is not None:
        callbacks.append(ReportProgress(reporter))
    if kernels is not None and state.is_main_process:
        callbacks.append(SaveKernelCache(kernels))

    trainer = sft_trainer_class()(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, callbacks=callbacks)
    trainer.count_label_rows = perf.avoid_host_waits
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # raw dict prints; ProgressReporter formats progress instead
    if cuda:
        from kubetune.trainer.memory_plan import use_offload_stash

        use_offload_stash(trainer)  # offloaded checkpoints (long rows): the stash the plan counted
    trainer.training_step = tokens.wrap(trainer.training_step)
    warmed = kernel_warmup.settle()  # the first step then finds the kernels compiled, and the child's memory free
    if warmed:
        print(warmed, flush=True)
    trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    step = trainer.state.global_step

    if stop_cb.stopped_at is not None:
        uri = f"{store.uri.rstrip('/')}/{artifacts.checkpoint_prefix(step)}/"
        if state.is_main_process:
            print(f"stopped on SIGTERM after step {step}; checkpoint {uri}", flush=True)
        return TrainResult(EXIT_PREEMPTED, step, stopped_by_signal=True, is_main=state.is_main_process)

    eval_loss = None
    if eval_ds is not None:
        # Reuse the eval of the final step when the schedule already ran it; otherwise evaluate now
        # (logged through ReportProgress.on_log like every other eval).
        final = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == step]
        eval_loss = float(final[-1]) if final else float(trainer.evaluate()["eval_loss"])
    if reporter is not None:
        reporter.close()
    adapter_uri = None
    adapter_dir = run_dir / "adapter"
    # Every rank takes part: under DeepSpeed ZeRO-3 the Trainer gathers the sharded weights first
    # (a plain save_pretrained on rank 0 wrote zero-sized LoRA tensors there).
    trainer.save_model(str(adapter_dir))
    if state.is_main_process:
        check_adapter_complete(adapter_dir)
        set_adapter_base_name(adapter_dir, cfg.base_model.served_name)
        if (run_dir / METRICS_FILE).exists():  # a run shorter than training.logEvery logged nothing
            shutil.copyfile(run_dir / METRICS_FILE, adapter_dir / METRICS_FILE)
        plot_loss_curve(read_metrics(run_dir / METRICS_FILE), adapter_dir / LOSS_CURVE_FILE)
        if (run_dir / TENSORBOARD_DIR).is_dir():
            shutil.copytree(run_dir / TENSORBOARD_DIR, adapter_dir / TENSORBOARD_DIR, dirs_exist_ok=True)
        artifacts.publish_dir(store, adapter_dir, artifacts.ADAPTER,
                              meta={"step": step, "evalLoss": eval_loss, "baseModel": cfg.base_model.served_name})
        adapter_uri = f"{store.uri.rstrip('/')}/{artifacts.ADAPTER}/"
        print(f"adapter: {adapter_uri} (step {step}, eval loss {eval_loss})", flush=True)
    state.wait_for_everyone()
    return TrainResult(0, step, adapter_uri, eval_loss, is_main=state.is_main_process)
