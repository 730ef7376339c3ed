"""`kubetune run job.yaml`: the whole pipeline (validate -> train -> merge -> evaluate) on this
machine, from the same FineTuneJob YAML a user would `kubectl apply`.

The job is parsed with the operator's API model and rendered with the
operator's `trainer_config_for`, so a local run and a cluster run train from
the same TrainerConfig. Storage:
  * spec.storage.endpointUrl set -> that S3 endpoint, as in the cluster;
  * otherwise --storage embedded (default) -> an in-process S3 server on a
    loopback port; inputs given with --dataset-file / --tiny-model are uploaded
    to the job's s3:// URIs, and the outputs are copied to --workdir at the end
    (the embedded server keeps everything in memory);
  * or --storage local -> every s3://bucket/key is the directory
    <workdir>/s3/bucket/key, no server at all.
"""

from __future__ import annotations

import enum
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer

from kubetune.trainer import artifacts
from kubetune.trainer.storage import is_s3, split_s3

EMBEDDED_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "kubetune-local", "AWS_SECRET_ACCESS_KEY": "kubetune-local",
                        "AWS_REGION": "us-east-1"}


class RunError(RuntimeError):
    pass


class Storage(str, enum.Enum):
    embedded = "embedded"
    local = "local"


def load_job(path: Path) -> Any:
    import yaml

    from kubetune.operator.api import FineTuneJob

    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    except (OSError, yaml.YAMLError) as e:
        raise RunError(f"cannot read {path}: {e}") from None
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == "FineTuneJob"]
    if len(jobs) != 1:
        raise RunError(f"{path}: expected exactly one FineTuneJob document, found {len(jobs)}")
    try:
        job = FineTuneJob.from_body(jobs[0])
    except Exception as e:  # pydantic ValidationError: names the spec field
        raise RunError(f"{path}: invalid FineTuneJob:\n{e}") from None
    from kubetune.operator.stages import refusals

    refused = refusals(job.spec)  # what the API server would refuse at admission
    if refused:
        raise RunError(f"{path}: invalid FineTuneJob:\n" + "\n".join(refused))
    return job


def check_job_file(job_file: Path, dataset_file: Optional[Path], model_dir: Optional[Path], spec_only: bool = False):
    """`kubetune validate job.yaml`: the API server's checks (schema, rules, what the stages can
    do), then the job's pipeline and revision. With `spec_only` returns an exit code; otherwise
    the trainer config for validating the data (local files override the job's URIs)."""
    from kubetune.operator import revisions
    from kubetune.operator.render import trainer_config_for
    from kubetune.operator.stages import pipeline

    try:
        job = load_job(job_file)
    except RunError as e:
        typer.secho(str(e), err=True, fg="red")
        raise typer.Exit(2) from None
    stages = " -> ".join(s.name for s in pipeline(job.spec))
    typer.echo(f"{job_file}: FineTuneJob {job.metadata.name} is valid: {stages}; revision {revisions.of(job)}")
    if spec_only:
        return 0
    cfg = trainer_config_for(job)
    cfg.job.name = cfg.job.namespace = None
    if dataset_file is not None:
        cfg.dataset.uri = str(dataset_file.resolve())
    if model_dir is not None:
        cfg.base_model.uri = str(model_dir.resolve())
    return cfg


def local_path_for(uri: str, root: Path) -> str:
    """s3://bucket/key -> <root>/bucket/key (the `--storage local` mapping). Pure."""
    bucket, key = split_s3(uri)
    return str(root / bucket / key) + ("/" if uri.endswith("/") else "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_embedded_s3():
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per S3 request otherwise

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def _buckets_of(cfg) -> set[str]:
    return {split_s3(u)[0] for u in (cfg.base_model.uri, cfg.dataset.uri, cfg.output.uri) if is_s3(u)}


def _upload_inputs(cfg, dataset_file: Optional[Path], tiny_model: bool, workdir: Path, put) -> None:
    from kubetune.trainer.tinymodel import texts_of_jsonl, write_tiny_model

    if dataset_file is not None:
        put(dataset_file, cfg.dataset.uri)
    if tiny_model:
        texts = texts_of_jsonl(dataset_file) if dataset_file and dataset_file.suffix == ".jsonl" else None
        from kubetune.trainer.tinymodel import DEFAULT_TEXTS

        model_dir = write_tiny_model(workdir / "tiny-model", texts or DEFAULT_TEXTS)
        for f in sorted(model_dir.iterdir()):
            put(f, cfg.base_model.uri.rstrip("/") + "/" + f.name)


def _stage(name: str, fn) -> Any:
    from kubetune.trainer.commands import expected_errors

    typer.secho(f"== {name}", bold=True)
    t0 = time.monotonic()
    try:
        out = fn()
    except tuple(expected_errors()) as e:  # the user's input or the machine: one line, no traceback
        raise RunError(f"stage {name} failed: {e}") from None
    code = out[0] if isinstance(out, tuple) else getattr(out, "exit_code", out)
    typer.echo(f"== {name}: {'ok' if code == 0 else f'exit {code}'} in {time.monotonic() - t0:.1f}s")
    if code != 0:
        raise RunError(f"stage {name} failed (exit {code})")
    return out


def run_pipeline(job_file: Path, *, workdir: Path, storage: str = "embedded", dataset_file: Optional[Path] = None,
                 tiny_model: bool = False, max_steps: Optional[int] = None) -> dict[str, Any]:
    from kubetune.operator.render import trainer_config_for
    from kubetune.operator.stages import pipeline
    from kubetune.trainer.evaluate import run_evaluate
    from kubetune.trainer.merge import run_merge
    from kubetune.trainer.storage import open_store, s3_client
    from kubetune.trainer.train import run_train
    from kubetune.trainer.validate import run_validate

    job = load_job(job_file)
    cfg = trainer_config_for(job)
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg.storage.cache_dir = str(workdir / "cache")
    cfg.job.name = cfg.job.namespace = None  # no FineTuneJob object exists: nothing to patch
    if max_steps is not None:
        cfg.training.max_steps = max_steps
    os.environ.setdefault("KUBETUNE_TERMINATION_LOG", str(workdir / "termination-log"))

    server = None
    if cfg.storage.endpoint_url is None and storage == "local":
        root = workdir / "s3"
        for field in ("base_model", "dataset", "output"):
            section = getattr(cfg, field)
            if is_s3(section.uri):
                section.uri = local_path_for(section.uri, root)

        def put(local: Path, uri: str) -> None:  # `uri` was already mapped to a directory above
            dst = Path(local_path_for(uri, root) if is_s3(uri) else uri)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(Path(local).read_bytes())

        put_uri = lambda u: local_path_for(u, root) if is_s3(u) else u  # noqa: E731
    else:
        if cfg.storage.endpoint_url is None:
            server, endpoint = start_embedded_s3()
            for k, v in EMBEDDED_CREDENTIALS.items():
                os.environ[k] = v
            cfg.storage.endpoint_url = endpoint
            client = s3_client(endpoint)
            for bucket in _buckets_of(cfg):
                client.create_bucket(Bucket=bucket)
            typer.echo(f"embedded S3 at {endpoint} (buckets: {', '.join(sorted(_buckets_of(cfg)))})")
        client = s3_client(cfg.storage.endpoint_url, cfg.storage.region)

        def put(local: Path, uri: str) -> None:
            bucket, key = split_s3(uri)
            client.upload_file(str(local), bucket, key)

        put_uri = lambda u: u  # noqa: E731
    # The operator's stage registry decides which stages run; each pod stage has its local twin.
    local = {
        "validate": lambda: run_validate(cfg, workdir / "validation-report.json"),
        "train": lambda: run_train(cfg),
        "merge": lambda: run_merge(cfg),
        "evaluate": lambda: run_evaluate(cfg),
    }
    try:
        _upload_inputs(cfg, dataset_file, tiny_model, workdir, put)
        outputs: dict[str, Any] = {}
        for stage in pipeline(job.spec):
            if stage.name not in local:
                typer.echo(f"== {stage.name}: runs in a cluster only (kubectl apply the same file)")
                continue
            outputs[stage.name] = _stage(stage.name, local[stage.name])
        train = outputs["train"]
        evaluation = outputs["evaluate"][1] if "evaluate" in outputs else None
        result = {"output": put_uri(cfg.output.uri), "step": train.global_step, "evalLoss": train.eval_loss,
                  "evaluation": evaluation, "merged": "merge" in outputs}
        if server is not None:
            # The embedded server lives in memory: copy the manifested artifacts out before it stops.
            store = open_store(cfg.output.uri, cfg.storage.endpoint_url)
            local_out = workdir / "output"
            prefixes = [artifacts.ADAPTER, artifacts.VALIDATION, artifacts.EVALUATION]
            if result["merged"]:
                prefixes.append(artifacts.MERGED)
            for prefix in prefixes:
                if artifacts.read_manifest(store, prefix) is not None:
                    artifacts.fetch_dir(store, prefix, local_out / prefix)
                    (local_out / prefix / artifacts.MANIFEST).write_bytes(store.get_bytes(f"{prefix}/{artifacts.MANIFEST}"))
            result["output"] = str(local_out)
        return result
    finally:
        if server is not None:
            server.stop()


def run(
    job_file: Path = typer.Argument(..., help="FineTuneJob YAML (the same file you would kubectl apply)."),
    workdir: Path = typer.Option(Path(".kubetune-run"), "--workdir", help="Cache, scratch and (embedded S3) outputs."),
    storage: Storage = typer.Option(Storage.embedded, "--storage", help="embedded: an in-process S3 server; local: "
                                    "directories under --workdir. Ignored when spec.storage.endpointUrl is set."),
    dataset_file: Optional[Path] = typer.Option(None, "--dataset-file", help="Upload this file to spec.dataset.uri first."),
    # metavar "": a flag takes no value, and the help should not suggest one.
    tiny_model: bool = typer.Option(False, "--tiny-model", metavar="",
                                    help="Write a tiny random-weight model to spec.baseModel.uri first."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Override spec.training.maxSteps."),
) -> None:
    """Run validate -> train -> merge -> evaluate locally (CPU or GPU) from a FineTuneJob YAML."""
    try:
        result = run_pipeline(job_file, workdir=workdir, storage=storage.value, dataset_file=dataset_file,
                              tiny_model=tiny_model, max_steps=max_steps)
    except RunError as e:
        typer.secho(str(e), err=True, fg="red")
        raise typer.Exit(1) from None
    out = result["output"].rstrip("/")
    typer.secho("\nartifacts:", bold=True)
    typer.echo(f"  adapter:     {out}/{artifacts.ADAPTER}/  (metrics.jsonl, loss_curve.png, tensorboard/)")
    if result["merged"]:
        typer.echo(f"  merged:      {out}/{artifacts.MERGED}/")
    typer.echo(f"  validation:  {out}/{artifacts.VALIDATION_REPORT}")
    typer.echo(f"  evaluation:  {out}/{artifacts.EVALUATION_REPORT}")
    ev = result.get("evaluation") or {}
    if ev:
        typer.echo(f"held-out loss {ev['base']['loss']:.4f} -> {ev['tuned']['loss']:.4f}; "
                   f"gate {'passed' if ev['passed'] else 'FAILED'}")
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    app.command("run")(run)
