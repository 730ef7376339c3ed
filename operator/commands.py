"""CLI commands of this part (registered by kubetune.cli)."""

import typer


def register(app: typer.Typer) -> None:
    pass
