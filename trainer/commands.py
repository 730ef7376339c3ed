"""CLI commands of the trainer: `kubetune validate|train|merge|evaluate --config X`.

Heavy imports (torch, transformers) happen inside the commands so that
`kubetune --help` stays fast. Config errors exit 2 with the field named.
Every expected failure (the user's input, the environment) ends the stage
with one line on stderr and a termination message, never a traceback; an
unexpected one (a bug) still gets its termination message before the
traceback, so the operator always learns why the pod stopped.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

CONFIG_HELP = "Trainer config file (YAML or JSON), as rendered by the operator."

# bitsandbytes warns on import on every CPU-only machine that its optional CPU kernels are absent;
# QLoRA is GPU-only here, so that line is noise in every stage's log.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _load(config: Path):
    from kubetune.trainer.config import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None


def _fail(stage: str, reason: str, err: Exception) -> None:
    from kubetune.trainer.termination import write_message

    write_message(stage, False, reason, str(err))
    typer.echo(f"{stage} failed: {err}", err=True)
    raise typer.Exit(1)


def expected_errors() -> dict[type, str]:
    """Errors that are the user's input or the environment -> their termination reason (first match wins)."""
    from kubetune.trainer.artifacts import CheckpointMismatch, IntegrityError
    from kubetune.trainer.dataformats import DatasetError
    from kubetune.trainer.modelio import ModelSourceError
    from kubetune.trainer.storage import StorageError
    from kubetune.trainer.tokenization import TemplateError
    from kubetune.trainer.train import TrainingError

    return {TrainingError: "TrainingRejected", CheckpointMismatch: "CheckpointOfAnotherRun",
            ModelSourceError: "BaseModelUnusable", StorageError: "StorageError", DatasetError: "DatasetUnreadable",
            TemplateError: "ChatTemplateUnusable", IntegrityError: "ArtifactCorrupted"}




def run_stage(stage: str, fn):
    """fn() with the stage's failures reported: an expected error is one line and exit 1; anything else
    writes an InternalError termination message first and keeps its traceback (it is a bug)."""
    errors = expected_errors()
    try:
        return fn()
    except tuple(errors) as e:
        _fail(stage, next(r for t, r in errors.items() if isinstance(e, t)), e)
    except (typer.Exit, KeyboardInterrupt):
        raise
    except Exception as e:
        from kubetune.trainer.termination import write_message

        first = " ".join(str(e).split())[:500]
        write_message(stage, False, "InternalError", f"{type(e).__name__}: {first} (unexpected; the traceback is in the pod log)")
        raise




def validate(
    job_file: Optional[Path] = typer.Argument(
        None, help="A FineTuneJob YAML: check it as the API server would, without a cluster (instead of --config)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the JSON report here instead of stdout."),
    no_upload: bool = typer.Option(False, "--no-upload", help="Do not publish validation/report.json."),
    data: bool = typer.Option(False, "--data", metavar="", help="With a FineTuneJob file: validate its data too."),
    dataset_file: Optional[Path] = typer.Option(None, "--dataset-file", help="With --data: this local file instead of dataset.uri."),
    model_dir: Optional[Path] = typer.Option(None, "--model-dir", help="With --data: this local model (tokenizer) instead of baseModel.uri."),
) -> None:
    """Check every dataset row and the token lengths against the base model; exit 1 on bad rows.

    `kubetune validate job.yaml` checks a FineTuneJob file instead (schema, rules, what the stages
    can do) and prints its pipeline and revision; add --data to validate its dataset as well."""
    from kubetune.trainer.validate import run_validate

    if (job_file is None) == (config is None):
        raise typer.BadParameter("give a FineTuneJob file or --config (a trainer config), not both", param_hint="JOB_FILE")
    if job_file is not None:
        # The CLI's view of a whole job: only here, never in a stage pod (which always has --config).
        from kubetune.localrun import check_job_file

        cfg = check_job_file(job_file, dataset_file, model_dir) if data else None
        if cfg is None:
            raise typer.Exit(check_job_file(job_file, None, None, spec_only=True))
        code, _ = run_stage("validate", lambda: run_validate(cfg, report, publish=False))
        raise typer.Exit(code)
    cfg = _load(config)
    code, _ = run_stage("validate", lambda: run_validate(cfg, report, publish=not no_upload))
    raise typer.Exit(code)


def train(config: Path = typer.Option(..., "--config", "-c", help=CONFIG_HELP)) -> None:
    """LoRA/QLoRA fine-tuning; resumes from the newest complete checkpoint; exits 143 after SIGTERM."""
    from kubetune.trainer import allocator, kernel_warmup, lazy_compile, prefetch

    cfg = _load(config)
    allocator.use_expandable_segments()  # before torch allocates: the reserve over the plan stays small
    kernel_warmup.start(config, cfg)  # compiles the run's kernels while this process imports and loads
    prefetch.start(cfg.base_model.uri)  # before torch: its files are read while it imports
    lazy_compile.import_bitsandbytes()  # before peft and transformers import it with torch's compiler stack

    from kubetune.trainer.termination import write_message
    from kubetune.trainer.train import run_train

    result = run_stage("train", lambda: run_train(cfg))

    if not result.is_main:
        pass  # one termination message per pod: rank 0's
    elif result.stopped_by_signal:
        write_message("train", False, "Preempted", f"stopped on SIGTERM at step {result.global_step}; a restart resumes from the newest "
                      "complete checkpoint",
                      step=result.global_step)
    else:
        write_message("train", True, "Trained", f"adapter at {result.adapter_uri}", step=result.global_step,
                      evalLoss=result.eval_loss, adapter=result.adapter_uri)
    sys.stdout.flush()
    raise typer.Exit(result.exit_code)


def merge(config: Path = typer.Option(..., "--config", "-c", help=CONFIG_HELP)) -> None:
    """Fold the adapter into the bf16 base model and publish merged/ (sharded safetensors + tokenizer)."""
    from kubetune.trainer.merge import run_merge

    cfg = _load(config)
    raise typer.Exit(run_stage("merge", lambda: run_merge(cfg)))


def evaluate(
    config: Path = typer.Option(..., "--config", "-c", help=CONFIG_HELP),
    fail_on_gate: bool = typer.Option(False, "--fail-on-gate", help="Exit 3 when the gate fails (the pod always exits 0 "
                                      "and reports the verdict in its termination message)."),
) -> None:
    """Held-out loss/perplexity of base vs tuned, sample generations, and the minImprovement gate."""
    from kubetune.trainer.evaluate import run_evaluate

    cfg = _load(config)
    code, report = run_stage("evaluate", lambda: run_evaluate(cfg))
    if code == 0 and fail_on_gate and not report.get("ok"):
        code = 3
    raise typer.Exit(code)


def make_tiny_model(
    out: Path = typer.Argument(..., help="Directory to write the model and tokenizer to."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="JSON Lines file whose text trains the tokenizer."),
    hidden_size: int = typer.Option(64, "--hidden-size"),
    layers: int = typer.Option(2, "--layers"),
    family: str = typer.Option("kubetune", "--family", help="Architecture and chat template: kubetune (Llama with "
                               "kubetune's own template), llama, mistral, qwen2, qwen3, gemma2, gemma3 or phi3 (the "
                               "template TRL ships for the family)."),
) -> None:
    """Write a tiny random-weight model + locally trained tokenizer (no downloads)."""
    from kubetune.trainer.tinymodel import DEFAULT_TEXTS, FAMILIES, texts_of_jsonl, write_tiny_model

    if family != "kubetune" and family not in FAMILIES:
        typer.echo(f"--family: unknown family {family!r} (kubetune, {', '.join(FAMILIES)})", err=True)
        raise typer.Exit(2)
    texts = texts_of_jsonl(dataset) if dataset else DEFAULT_TEXTS
    typer.echo(str(write_tiny_model(out, texts, hidden_size=hidden_size, layers=layers, family=family)))


def verify_artifact(
    uri: str = typer.Argument(..., help="s3://bucket/prefix/ (or a local folder) of a published artifact."),
    tensor_parallel_size: Optional[int] = typer.Option(
        None, "--tensor-parallel-size", help="Also check config.json's heads split over this many GPUs."),
) -> None:
    """Check an artifact against its MANIFEST.json (every file's sha256, no unlisted file) before serving it."""
    from kubetune.trainer.verify import run_verify

    raise typer.Exit(run_stage("verify-artifact", lambda: run_verify(uri, tensor_parallel_size)))


def adapter_loader(
    server: str = typer.Option(..., "--server", help="The AdapterServer this pod serves."),
    namespace: Optional[str] = typer.Option(None, "--namespace", envvar="POD_NAMESPACE", help="Its namespace."),
    vllm_url: str = typer.Option("http://127.0.0.1:8000", "--vllm-url", help="The pod's vLLM."),
    root: Path = typer.Option(Path("/adapters"), "--dir", help="Where verified adapters are kept (shared with vLLM)."),
    port: int = typer.Option(8001, "--port", help="Port of the /ready and /healthz probes."),
    interval: float = typer.Option(5.0, "--interval", help="Seconds between passes."),
    passes: Optional[int] = typer.Option(None, "--passes", help="Stop after this many passes (default: never)."),
) -> None:
    """The sidecar of a shared adapter server: load the adapters its jobs assign, verified, into vLLM."""
    import os

    from kubetune.trainer import adapter_loader as loader

    if not namespace:
        typer.echo("--namespace (or POD_NAMESPACE) is required", err=True)
        raise typer.Exit(2)
    root.mkdir(parents=True, exist_ok=True)
    probe = loader.Probe(stall_after=max(60.0, interval * 12))
    probes = loader.serve_probes(probe, port)
    try:
        loader.run_sidecar(
            loader.ServerObject(server, namespace), loader.VllmClient(vllm_url, api_key=os.environ.get("VLLM_API_KEY")),
            root, probe, pod=os.environ.get("POD_NAME", "local"), endpoint_url=os.environ.get("AWS_ENDPOINT_URL"),
            region=os.environ.get("AWS_REGION"), interval=interval, passes=passes,
            log=lambda line: typer.echo(line, err=True),
        )
    finally:
        probes.shutdown()


def register(app: typer.Typer) -> None:
    app.command("adapter-loader")(adapter_loader)
    app.command("verify-artifact")(verify_artifact)
    app.command("validate")(validate)
    app.command("train")(train)
    app.command("merge")(merge)
    app.command("evaluate")(evaluate)
    app.command("tiny-model")(make_tiny_model)
