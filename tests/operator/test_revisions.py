"""GitOps edits on the real control plane: recipe edits are new content-addressed
revisions, a revert reuses the old artifact without training, operator-only
edits reach the children, and a finished stage never runs again."""

from __future__ import annotations

import time

from kubetune.devcluster.cluster import wait_for

from .ftj import KWOK_DURATION, KWOK_FAIL, Api, body, condition, fleet

KWOK_FAIL_AFTER = "kwok.kubetune.io/fail-after"

RECONCILE_INTERVAL = 0.5  # what start_operator sets (tests/operator/conftest.py)


def train_jobs(api: Api, name: str) -> list[str]:
    return sorted(j["metadata"]["name"] for j in api.jobs(name) if j["metadata"]["labels"]["kubetune.io/stage"] == "train")


def revision_entry(status: dict, rev: str) -> dict:
    return next(r for r in status["revisions"] if r["id"] == rev)


def test_a_recipe_edit_is_a_new_revision_and_a_revert_reuses_the_old_artifact(cluster, namespace, gpu_nodes,
                                                                                start_operator):
    fleet(gpu_nodes)
    api = Api(cluster, namespace)
    start_operator(namespace)
    api.create(body("gitops", serving={"enabled": False}))
    status = api.wait_phase("gitops", "Succeeded", timeout=90)
    rev1 = api.rev("gitops")
    assert status["revision"] == rev1
    adapter1 = status["artifacts"]["adapter"]
    assert adapter1 == f"s3://artifacts/gitops/revisions/{rev1}/adapter/"
    assert train_jobs(api, "gitops") == [f"gitops-train-{rev1}"]

    # Edit the learning rate: revision 2, its own training Job and its own prefix.
    api.patch("gitops", {"spec": {"training": {"learningRate": 0.001}}})
    rev2 = api.rev("gitops")
    assert rev2 != rev1
    status = wait_for("revision 2 done", lambda: (s := api.status("gitops")).get("revision") == rev2
                      and s.get("phase") == "Succeeded" and s.get("observedGeneration") == 2 and s, timeout=90)
    assert status["artifacts"]["adapter"] == f"s3://artifacts/gitops/revisions/{rev2}/adapter/"
    ids = [r["id"] for r in status["revisions"]]
    assert ids == [rev1, rev2]
    # Revision 1's record (and so its artifact URIs) is untouched.
    assert revision_entry(status, rev1)["artifacts"]["adapter"] == adapter1
    assert set(revision_entry(status, rev2)["stages"]) == {"validate", "train", "merge", "evaluate"}
    # Once revision 2 is done, revision 1's children are removed.
    wait_for("revision 1 children pruned", lambda: train_jobs(api, "gitops") == [f"gitops-train-{rev2}"], timeout=30)
    assert f"gitops-config-{rev1}" not in api.children("gitops")["ConfigMap"]

    # Revert: revision 1 again, from its record: no training Job is created.
    api.patch("gitops", {"spec": {"training": {"learningRate": 0.0002}}})
    assert api.rev("gitops") == rev1
    status = wait_for("revert done", lambda: (s := api.status("gitops")).get("revision") == rev1
                      and s.get("phase") == "Succeeded" and s.get("observedGeneration") == 3 and s, timeout=60)
    assert status["artifacts"]["adapter"] == adapter1
    assert [r["id"] for r in status["revisions"]] == [rev2, rev1]
    wait_for("revision 2 children pruned", lambda: train_jobs(api, "gitops") == [], timeout=30)
    assert all(j["metadata"]["labels"]["kubetune.io/stage"] != "train" for j in api.jobs("gitops"))
    reasons = {e["reason"] for e in api.events("gitops")}
    assert "SupersededChildDeleted" in reasons


def test_an_edit_while_training_stops_the_superseded_run(cluster, namespace, gpu_nodes, start_operator):
    fleet(gpu_nodes)
    api = Api(cluster, namespace)
    start_operator(namespace)
    api.create(body("switch", serving={"enabled": False}, podMetadata={"train": {"annotations": {KWOK_DURATION: "60s"}}}))
    api.wait_phase("switch", "Training", timeout=60)
    rev1 = api.rev("switch")
    api.patch("switch", {"spec": {"method": {"r": 32}}})
    rev2 = api.rev("switch")
    # Revision 1's running train Job is deleted (its GPUs freed); revision 2 trains on its own.
    wait_for("revision 1's train Job deleted", lambda: f"switch-train-{rev1}" not in train_jobs(api, "switch"), timeout=30)
    status = wait_for("revision 2 training", lambda: (s := api.status("switch")).get("revision") == rev2
                      and s.get("phase") == "Training" and s, timeout=60)
    assert train_jobs(api, "switch") == [f"switch-train-{rev2}"]
    assert revision_entry(status, rev1)["phase"] == "Superseded"
    assert status["observedGeneration"] == 2 and condition(status, "Reconciling")["status"] == "True"


def test_serving_edits_reach_the_deployment_and_a_finished_stage_never_runs_again(cluster, namespace, gpu_nodes,
                                                                                   start_operator):
    fleet(gpu_nodes)
    api = Api(cluster, namespace)
    start_operator(namespace)
    api.create(body("edits"))
    api.wait_phase("edits", "Serving", timeout=90)

    def command():
        dep = api.raw(api.apps.read_namespaced_deployment, "edits-serve", namespace)
        return dep["spec"]["template"]["spec"]["containers"][0]["command"]

    assert command()[command().index("--served-model-name") + 1] == "edits"
    api.patch("edits", {"spec": {"serving": {"servedModelName": "support-v2", "maxModelLen": 4096}}})
    # observedGeneration follows only once the Deployment carries the edit and has rolled it out.
    status = wait_for("edit served", lambda: (s := api.status("edits")).get("observedGeneration") == 2
                      and s.get("phase") == "Serving" and s, timeout=60)
    args = command()
    assert args[args.index("--served-model-name") + 1] == "support-v2"
    assert args[args.index("--max-model-len") + 1] == "4096"
    assert status["endpoint"]["model"] == "support-v2"
    assert status["revision"] == api.rev("edits")  # an operator-only edit keeps the revision

    # A hand edit of a managed field is put back by the next pass (server-side apply, forced).
    api.apps.patch_namespaced_deployment("edits-serve", namespace, {"spec": {"replicas": 4}})
    wait_for("replicas put back", lambda: api.raw(api.apps.read_namespaced_deployment, "edits-serve",
                                                  namespace)["spec"]["replicas"] == 1, timeout=30)

    # Delete the finished train Job: the stage is recorded as done and never runs again.
    train = api.child("edits", "train")
    api.batch.delete_namespaced_job(train, namespace, propagation_policy="Background")
    wait_for("train Job gone", lambda: train not in [j["metadata"]["name"] for j in api.jobs("edits")], timeout=30)
    time.sleep(3 * RECONCILE_INTERVAL + 1)  # several reconcile passes
    status = api.wait_phase("edits", "Serving", timeout=30)
    assert train not in [j["metadata"]["name"] for j in api.jobs("edits")]
    assert condition(status, "Trained")["status"] == "True"


def test_one_failed_rank_restarts_the_whole_gang_within_bounds(cluster, namespace, gpu_nodes, start_operator):
    fleet(gpu_nodes, count=2)
    api = Api(cluster, namespace)
    start_operator(namespace)
    # Rank 1 dies 0.3 s in (no verdict: a crash); rank 0 would train for a minute.
    api.create(body("gang", resources={"nodes": 2, "gpusPerNode": 8, "maxRestarts": 2}, serving={"enabled": False},
                    podMetadata={"train": {"labels": {KWOK_FAIL: "rank-1"},
                                           "annotations": {KWOK_DURATION: "60s", KWOK_FAIL_AFTER: "300ms"}}}))
    train = None
    uids: set[str] = set()

    def watch_gang():
        nonlocal train
        train = train or api.child("gang", "train")
        jobs = [j for j in api.jobs("gang") if j["metadata"]["name"] == train]
        uids.update(j["metadata"]["uid"] for j in jobs)
        status = api.status("gang")
        return status if status.get("phase") == "Failed" else None

    status = wait_for("gang restarts used up", watch_gang, timeout=120, interval=0.2)
    # Two restarts, each a new Job of every rank: three gangs in all, the last one failed for good.
    assert len(uids) == 3, uids
    assert revision_entry(status, api.rev("gang"))["restarts"] == 2
    trained = condition(status, "Trained")
    assert trained["status"] == "False" and "maxRestarts" in trained["message"] and "gang-train" in trained["message"]
    restarts = [e for e in api.events("gang") if e["reason"] == "GangRestarted"]
    assert len(restarts) == 2 and "restart 1 of 2" in restarts[0]["message"]
    # Rank 0 was stopped with its gang each time: no pod of the gang is left running.
    pods = api.pods(f"kubetune.io/job=gang,kubetune.io/stage=train")
    assert all(p["status"].get("phase") != "Running" for p in pods), [p["status"].get("phase") for p in pods]
