"""CLI commands of this part (registered by kubetune.cli):

    kubetune dev cluster up [--foreground] [--gpu-nodes N] [--cpu-nodes N] [--kueue]
    kubetune dev cluster env
    kubetune dev cluster down
"""

from __future__ import annotations

import typer

dev_app = typer.Typer(help="Development tools.", no_args_is_help=True)
cluster_app = typer.Typer(
    help="A real Kubernetes control plane on loopback (etcd, kube-apiserver, "
    "kube-controller-manager, kube-scheduler, kwok fake GPU and CPU nodes; Kueue on request).",
    no_args_is_help=True,
)
dev_app.add_typer(cluster_app, name="cluster")

# One development cluster per cache root; tests use their own run directories.
_DEV_RUN_NAME = "dev"


def _run_dir():
    from kubetune.devcluster import paths

    return paths.run_root() / _DEV_RUN_NAME


def _running_state() -> dict | None:
    """state.json of the development cluster if all its components still run."""
    from kubetune.devcluster import controlplane, processes

    try:
        state = controlplane.load(_run_dir())
    except (OSError, ValueError):
        return None
    if state["pids"] and all(processes.is_alive(pid) for pid in state["pids"].values()):
        return state
    return None


@cluster_app.command("up")
def up(
    foreground: bool = typer.Option(False, "--foreground", "-f", help="Stay attached; Ctrl-C stops the cluster."),
    gpu_nodes: int = typer.Option(1, "--gpu-nodes", min=0, help="Fake 8-GPU nodes to create (tainted nvidia.com/gpu)."),
    cpu_nodes: int = typer.Option(
        1, "--cpu-nodes", min=0,
        help="Fake CPU-only, untainted nodes to create: pods without a GPU toleration (validate, merge) schedule there.",
    ),
    kueue: bool = typer.Option(
        False, "--kueue",
        help="Also start Kueue (batch/job integration, webhooks on loopback); the first use builds it (minutes).",
    ),
) -> None:
    """Start the control plane (building it on first use) and print its KUBECONFIG."""
    import shutil
    import signal
    import time

    from kubetune.devcluster import build, controlplane
    from kubetune.devcluster.cluster import Cluster

    state = _running_state()
    if state:
        typer.echo(f"already running: {state['server']}")
        typer.echo(f"export KUBECONFIG={state['kubeconfig']}")
        return
    run_dir = _run_dir()
    if run_dir.exists():
        # Left over from a cluster that died or was half stopped.
        if (run_dir / "state.json").exists():
            controlplane.stop_from_state(run_dir)
        shutil.rmtree(run_dir)
    try:
        plane = controlplane.start(run_dir=run_dir, die_with_parent=foreground)
    except (build.GoMissingError, build.BuildError) as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(2) from None
    except controlplane.StartError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(1) from None
    cluster = Cluster(plane)
    for index in range(gpu_nodes):
        cluster.create_gpu_node(f"gpu-node-{index}")
    for index in range(cpu_nodes):
        cluster.create_cpu_node(f"cpu-node-{index}")
    if kueue:
        from kubetune.devcluster import kueue as kueue_addon

        try:
            kueue_addon.start(plane)
        except (build.GoMissingError, build.BuildError, controlplane.StartError, RuntimeError) as error:
            typer.echo(str(error), err=True)
            plane.stop()
            raise typer.Exit(1) from None
    typer.echo(f"export KUBECONFIG={plane.kubeconfig}")
    typer.echo(f"kubectl: {plane.binaries['kubectl']}")
    if not foreground:
        typer.echo("stop it with: kubetune dev cluster down")
        return
    typer.echo(f"logs: {plane.run_dir}/logs; Ctrl-C stops the cluster")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while plane.dead_component() is None:
            time.sleep(1)
        typer.echo(f"{plane.dead_component()} exited:\n{plane.log_tails(20)}", err=True)
    except KeyboardInterrupt:
        pass
    finally:
        plane.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@cluster_app.command("env")
def env() -> None:
    """Print `export KUBECONFIG=...` for the running development cluster."""
    state = _running_state()
    if not state:
        typer.echo("no development cluster is running; start one with: kubetune dev cluster up", err=True)
        raise typer.Exit(1)
    typer.echo(f"export KUBECONFIG={state['kubeconfig']}")


@cluster_app.command("down")
def down() -> None:
    """Stop the development cluster and delete its run directory."""
    import shutil

    from kubetune.devcluster import controlplane

    run_dir = _run_dir()
    if not (run_dir / "state.json").exists():
        typer.echo("no development cluster is running")
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    stopped = controlplane.stop_from_state(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    typer.echo(f"stopped: {', '.join(stopped) or 'nothing was running'}")


def register(app: typer.Typer) -> None:
    app.add_typer(dev_app, name="dev")
