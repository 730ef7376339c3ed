"""CLI commands of this part (registered by kubetune.cli): `kubetune operator`, `kubetune crd`."""

from __future__ import annotations

from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
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

    @app.command("crd")
    def crd_cmd(
        output: str = typer.Option("-", "--output", "-o", help="File to write ('-': stdout)."),
    ) -> None:
        """Print (or write) the FineTuneJob CRD generated from the API model."""
        from kubetune.operator.crdgen import main

        raise typer.Exit(main(["-o", output]))
