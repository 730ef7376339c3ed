"""The one `kubetune` entry point.

Each part registers its own commands (module `commands` of each part), and
imports its heavy dependencies (torch, kopf) inside the command, so that
`kubetune --help` stays fast.
"""

import typer

app = typer.Typer(
    name="kubetune",
    help="Fine-tune, evaluate and serve LLMs on Kubernetes from one FineTuneJob.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from kubetune import localrun
    from kubetune.devcluster import commands as devcluster
    from kubetune.operator import commands as operator
    from kubetune.trainer import commands as trainer

    trainer.register(app)
    operator.register(app)
    devcluster.register(app)
    localrun.register(app)


_register()


def main() -> None:
    app()
