"""CLI commands of this part (registered by kubetune.cli): `kubetune operator`, `status`, `crd`, `render`, `delete-artifacts`."""

from __future__ import annotations

from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    from kubetune.operator import chat  # `kubetune chat` (a client of the served model; no heavy imports)

    chat.register(app)

    @app.command("operator")
    def operator_cmd(
        namespace: Optional[List[str]] = typer.Option(
            None, "--namespace", "-n", help="Watch only these namespaces (repeatable); all namespaces by default."
        ),
        liveness: str = typer.Option(
            "http://0.0.0.0:8081/healthz", help="kopf liveness endpoint ('' to disable)."
        ),
        verbose: bool = typer.Option(False, "--verbose", help="Debug logging."),
    ) -> None:
        """Run the FineTuneJob operator (kopf) against the current kubeconfig or in-cluster config."""
        import asyncio
        import logging

        import kopf

        from kubetune.operator import handlers  # noqa: F401  (registers the handlers)

        kopf.configure(verbose=verbose)
        if not verbose:
            # kopf logs every timer run ("Timer ... succeeded"): noise at our interval.
            logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        asyncio.run(
            kopf.operator(
                standalone=True,  # one replica, Recreate strategy: no peering needed
                clusterwide=not namespace,
                namespaces=namespace or (),
                liveness_endpoint=liveness or None,
            )
        )

    @app.command("status")
    def status_cmd(
        name: str = typer.Argument(..., help="FineTuneJob name."),
        namespace: Optional[str] = typer.Option(None, "--namespace", "-n", help="Namespace (default: the kubeconfig's)."),
        output: str = typer.Option("text", "--output", "-o", help="text or json."),
    ) -> None:
        """Show a FineTuneJob's phase, progress, conditions, artifacts and endpoint."""
        import json

        from kubernetes import client, config
        from kubernetes.client.exceptions import ApiException

        from kubetune.contract.facts import GROUP, PLURAL, VERSION
        from kubetune.operator.describe import describe

        if output not in ("text", "json"):
            raise typer.BadParameter("must be text or json", param_hint="--output")
        try:
            config.load_kube_config()
            ns = namespace or config.list_kube_config_contexts()[1]["context"].get("namespace") or "default"
        except config.ConfigException:
            config.load_incluster_config()
            ns = namespace or "default"
        try:
            obj = client.CustomObjectsApi().get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        except ApiException as e:
            typer.echo(f"FineTuneJob {ns}/{name}: {e.reason} ({e.status})", err=True)
            raise typer.Exit(1)
        typer.echo(json.dumps(obj.get("status") or {}, indent=2) if output == "json" else describe(obj))

    @app.command("delete-artifacts")
    def delete_artifacts_cmd(
        config: str = typer.Option(..., "--config", "-c", help="Trainer config (its storage settings are used)."),
        uri: Optional[str] = typer.Option(None, "--uri", help="Prefix to empty; the config's output.uri by default."),
    ) -> None:
        """Delete every artifact under a job's output (the cleanup Job of deleteOnJobDeletion)."""
        from pathlib import Path

        from kubetune.operator.artifact_cleanup import run

        raise typer.Exit(run(Path(config), uri))

    @app.command("crd")
    def crd_cmd(
        output: str = typer.Option("-", "--output", "-o", help="File to write ('-': stdout)."),
    ) -> None:
        """Print (or write) the FineTuneJob CRD generated from the API model."""
        from kubetune.operator.crdgen import main

        raise typer.Exit(main(["-o", output]))

    @app.command("render")
    def render_cmd(
        job_file: str = typer.Argument(..., help="FineTuneJob YAML (the file you would kubectl apply)."),
        stage: Optional[str] = typer.Option(None, "--stage", help="Only this stage's children."),
        namespace: str = typer.Option("default", "--namespace", "-n", help="Namespace when the file names none."),
    ) -> None:
        """Check a FineTuneJob file as the API server would and print the children the operator
        would create for it, stage by stage (a dry run: nothing is sent to a cluster)."""
        from pathlib import Path

        import yaml

        from kubetune.localrun import RunError, load_job
        from kubetune.operator import stages
        from kubetune.operator.settings import OperatorSettings

        try:
            job = load_job(Path(job_file))
        except RunError as e:
            typer.secho(str(e), err=True, fg="red")
            raise typer.Exit(1) from None
        # Children are owned by the job's uid, which only the API server assigns.
        job.metadata.uid = job.metadata.uid or "00000000-0000-0000-0000-000000000000"
        job.metadata.namespace = job.metadata.namespace or namespace
        wanted = stages.pipeline(job.spec)
        if stage is not None and stage not in {s.name for s in wanted}:
            raise typer.BadParameter(f"this job's stages are {', '.join(s.name for s in wanted)}", param_hint="--stage")
        seen: set[tuple[str, str]] = set()
        docs = []
        for s in wanted:
            if stage is not None and s.name != stage:
                continue
            for obj in s.build(job, OperatorSettings()):
                key = (obj["kind"], obj["metadata"]["name"])
                if key not in seen:  # shared objects (RBAC, ConfigMap) once
                    seen.add(key)
                    docs.append(obj)
        typer.echo(yaml.safe_dump_all(docs, sort_keys=False), nl=False)
