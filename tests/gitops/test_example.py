"""The GitOps example (manifests/gitops): every overlay rendered by kustomize (the
harness's kubectl, the server's version, built and cached like the control
plane) into FineTuneJobs the API and every stage accept; each overlay's pull
request changes the revision; the Argo CD Applications and Flux Kustomizations
point at the overlays and the jobs they render; the Argo CD Component puts the
chart's health script into argocd-cm."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from kubetune.operator import revisions, stages
from kubetune.operator.api import FineTuneJob

from . import record

ROOT = record.ROOT
EXAMPLE = ROOT / "manifests" / "gitops"
OVERLAYS = sorted(p.name for p in (EXAMPLE / "overlays").iterdir() if p.is_dir())
# Each overlay's pull request: the field it edits, the value before and after.
PULL_REQUESTS = {
    "staging": (("training", "learningRate"), 0.0002, 0.0003),
    "production": (("dataset", "uri"), "s3://datasets/support/v1/tickets.jsonl", "s3://datasets/support/v2/tickets.jsonl"),
}


@pytest.fixture(scope="session")
def kubectl() -> Path:
    from kubetune.devcluster import build, versions

    try:
        binary = build.ensure_built(wanted=[t for t in build.targets() if t.name == "kubectl"])["kubectl"]
    except (build.GoMissingError, build.BuildError) as error:
        pytest.fail(f"kubectl could not be built: {error}", pytrace=False)  # never skip
    client = subprocess.run([str(binary), "version", "--client", "-o", "yaml"], capture_output=True, text=True, check=True)
    assert yaml.safe_load(client.stdout)["clientVersion"]["gitVersion"] == versions.KUBERNETES
    return binary


def kustomize(kubectl: Path, folder: Path) -> list[dict]:
    result = subprocess.run([str(kubectl), "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def rendered_job(kubectl: Path, overlay: str) -> dict:
    (doc,) = kustomize(kubectl, EXAMPLE / "overlays" / overlay)
    return doc


def overlay_namespace(overlay: str) -> str:
    return yaml.safe_load((EXAMPLE / "overlays" / overlay / "kustomization.yaml").read_text())["namespace"]


def test_the_example_has_the_overlays_the_docs_name():
    assert OVERLAYS == sorted(PULL_REQUESTS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders_a_finetunejob_the_api_and_every_stage_accept(kubectl, overlay):
    doc = rendered_job(kubectl, overlay)
    assert (doc["apiVersion"], doc["kind"]) == ("kubetune.io/v1alpha1", "FineTuneJob")
    assert doc["metadata"]["namespace"] == overlay_namespace(overlay)
    job = FineTuneJob.from_body(doc)
    assert stages.refusals(job.spec) == []
    assert [s.name for s in stages.pipeline(job.spec)] == ["validate", "train", "merge", "evaluate", "serve"]
    # Each environment writes its own artifacts.
    assert f"/{overlay}/" in job.spec.output.uri


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_pull_request_makes_a_new_revision_and_its_revert_the_old_one(kubectl, overlay):
    doc = rendered_job(kubectl, overlay)
    (section, field), before, after = PULL_REQUESTS[overlay]
    assert doc["spec"][section][field] == after, "the overlay's pull request is applied"
    base = yaml.safe_load((EXAMPLE / "base" / "finetunejob.yaml").read_text())
    assert base["spec"][section][field] == before
    edited = revisions.of(FineTuneJob.from_body(doc))
    doc["spec"][section][field] = before  # git revert
    reverted = revisions.of(FineTuneJob.from_body(doc))
    assert edited != reverted, f"spec.{section}.{field} defines the artifact: its edit is a new revision"


def test_the_argocd_applications_sync_the_overlays(kubectl):
    apps = list(yaml.safe_load_all((EXAMPLE / "argocd" / "applications.yaml").read_text()))
    assert sorted(a["spec"]["source"]["path"] for a in apps) == [f"manifests/gitops/overlays/{o}" for o in OVERLAYS]
    for app in apps:
        assert (app["apiVersion"], app["kind"]) == ("argoproj.io/v1alpha1", "Application")
        overlay = Path(app["spec"]["source"]["path"]).name
        assert (ROOT / app["spec"]["source"]["path"] / "kustomization.yaml").is_file()
        assert app["spec"]["destination"]["namespace"] == rendered_job(kubectl, overlay)["metadata"]["namespace"]


def test_the_flux_kustomizations_wait_for_the_jobs_they_apply(kubectl):
    kustomizations = {k["metadata"]["name"]: k for k in yaml.safe_load_all((EXAMPLE / "flux" / "kustomizations.yaml").read_text())}
    assert sorted(k["spec"]["path"] for k in kustomizations.values()) == [f"./manifests/gitops/overlays/{o}" for o in OVERLAYS]
    for k in kustomizations.values():
        assert (k["apiVersion"], k["kind"]) == ("kustomize.toolkit.fluxcd.io/v1", "Kustomization")
        doc = rendered_job(kubectl, Path(k["spec"]["path"]).name)
        # Flux waits on the job either way: every applied object (wait) or the listed ones (healthChecks).
        checks = k["spec"].get("healthChecks") or []
        assert k["spec"].get("wait") is True or {
            (c["apiVersion"], c["kind"], c["name"], c["namespace"]) for c in checks
        } == {(doc["apiVersion"], doc["kind"], doc["metadata"]["name"], doc["metadata"]["namespace"])}
    production = kustomizations["support-bot-production"]
    assert production["spec"]["healthChecks"] and production["spec"]["dependsOn"] == [{"name": "support-bot-staging"}]
    assert kustomizations["support-bot-staging"]["spec"]["wait"] is True


def test_the_argocd_component_adds_the_charts_health_check_to_argocd_cm(kubectl, tmp_path):
    # Argo CD's own argocd-cm as its install manifest has it (no namespace: the installing
    # kustomization sets one), with a setting of its own that must survive the patch.
    (tmp_path / "argocd-cm.yaml").write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "argocd-cm", "labels": {"app.kubernetes.io/part-of": "argocd"}},
        "data": {"timeout.reconciliation": "180s"}}))
    component = os.path.relpath(EXAMPLE / "argocd" / "health-check", tmp_path)  # kustomize wants it relative
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(
        {"namespace": "argocd", "resources": ["argocd-cm.yaml"], "components": [component]}))
    (cm,) = kustomize(kubectl, tmp_path)
    assert cm["metadata"]["namespace"] == "argocd"
    assert cm["data"] == {"timeout.reconciliation": "180s", record.HEALTH_KEY: record.HEALTH_LUA.read_text()}
