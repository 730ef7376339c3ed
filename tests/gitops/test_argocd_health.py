"""The Argo CD health check (charts/kubetune/files/argocd-health.lua) under the
real Lua interpreter, run the way Argo CD runs a custom health check (a global
`obj`, only the base and table libraries, every number a float), over:

- recorded/*.json: FineTuneJobs whose status the operator's own code produced
  (tests/gitops/record.py; a test fails when they differ from what the code
  produces now, so they cannot drift), one or more for every phase and every
  rollout state (`Promoted`) the code has.

Each fixture names its expected health and what its message must say.
docs/gitops.md gives the rules and the reasons for them."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from kubetune.operator import stages

from . import kstatus, lua, record

HERE = Path(__file__).resolve().parent
RECORDED = sorted((HERE / "recorded").glob("*.json"))
HEALTH = ("Healthy", "Progressing", "Degraded", "Suspended")
# The rollout's Promoted condition (issue #17): True once the asked-for revision serves; False while it
# is built (RolloutInProgress) or when it was held back (its gate, its canary, a failed stage).
ROLLOUT_STATES = {("True", "RevisionServing"), ("False", "RolloutInProgress"), ("False", "EvaluationGateFailed"),
                  ("False", "CanaryFailed"), ("False", "RevisionFailed")}
# Recorded states where the operator's status is known to mislead; strict: the test fails once it is fixed.
# States where the operator's status is known to mislead (none now: a new revision's status no longer
# carries the last one's training progress). Each would be an xfail(strict) until fixed.
KNOWN_OPERATOR_GAPS: dict[str, str] = {}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def fixture_id(path: Path) -> str:
    return path.stem


FIXTURES = {fixture_id(p): load(p) for p in RECORDED}


def derived() -> dict[str, tuple[dict, str, list[str]]]:
    """Objects the fixtures do not hold, made from a recorded one by one edit (name -> object, health, message)."""
    out = {}
    serving = FIXTURES["serving"]["object"]
    lagging = copy.deepcopy(serving)
    for cond in lagging["status"]["conditions"]:
        if cond["type"] == "Ready":
            cond.update(status="False", reason="Deploying")
    out["serving-before-ready"] = (lagging, "Progressing", ["waiting for the Ready condition"])
    newer = copy.deepcopy(serving)
    newer["status"]["phase"] = "Hibernating"  # a phase of a newer operator than this script
    out["unknown-phase"] = (newer, "Unknown", ["unknown phase Hibernating"])
    unseen = copy.deepcopy(serving)
    del unseen["status"]["observedGeneration"]
    out["no-observed-generation"] = (unseen, "Progressing", ["waiting for the operator to observe generation 1"])
    return out


DERIVED = derived()


@pytest.fixture(scope="session")
def lua_bin() -> str:
    try:
        return lua.ensure_lua()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)  # never skip: a skipped health check proves nothing


def all_objects() -> dict[str, dict]:
    objects = {name: f["object"] for name, f in FIXTURES.items()}
    objects.update({name: obj for name, (obj, _, _) in DERIVED.items()})
    return objects


@pytest.fixture(scope="session")
def health(lua_bin) -> dict[str, dict]:
    """The script's answer for every fixture and derived object, from one interpreter run."""
    return lua.run(lua_bin, record.HEALTH_LUA, all_objects())


@pytest.fixture(scope="session")
def gopherlua(tmp_path_factory) -> Path:
    """Argo CD's Lua (gopher-lua, a release of the interpreter Argo CD embeds) run the way Argo CD runs
    a custom health check: tests/gitops/gopherlua, built with the machine's Go."""
    from kubetune.devcluster import build

    try:
        return lua.build_gopherlua(build.find_go(), tmp_path_factory.mktemp("gopherlua") / "gopherlua")
    except (build.GoMissingError, RuntimeError) as e:
        pytest.fail(str(e), pytrace=False)  # never skip


def check(answer: dict, health: str, message: list[str], absent: list[str] = ()) -> None:
    assert "error" not in answer, answer["error"]
    assert answer["status"] == health, answer
    for part in message:
        assert part in answer["message"], (part, answer["message"])
    for part in absent:
        assert part not in answer["message"], (part, answer["message"])


def fixture_params():
    for name in sorted(FIXTURES):
        gap = KNOWN_OPERATOR_GAPS.get(name)
        yield pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=gap)) if gap else name


@pytest.mark.parametrize("name", list(fixture_params()))
def test_each_status_has_its_expected_health(health, name):
    expect = FIXTURES[name]["expect"]
    assert expect["health"] in HEALTH and expect["message"], "every fixture names its health and a message check"
    check(health[name], expect["health"], expect["message"], expect.get("absent", []))


def test_the_known_gaps_are_recorded_states():
    assert set(KNOWN_OPERATOR_GAPS) <= set(FIXTURES)


@pytest.mark.parametrize("name", sorted(DERIVED))
def test_edge_cases(health, name):
    _, expected, message = DERIVED[name]
    check(health[name], expected, message)


def test_the_recorded_objects_are_what_the_code_produces():
    files = record.rendered()
    stale = sorted(p.name for p in RECORDED if p not in files)
    differ = sorted(str(p.relative_to(record.ROOT)) for p, text in files.items() if not p.exists() or p.read_text() != text)
    assert not differ and not stale, (
        f"the operator's code now produces other status objects ({differ}; no longer produced: {stale}): run "
        "`.venv/bin/python tests/gitops/record.py`, review the diff and what the health check says about it")


def test_every_phase_and_every_health_is_recorded_from_code():
    recorded = [load(p) for p in RECORDED]
    phases = {f["object"]["status"].get("phase") for f in recorded}
    assert set(stages.phases()) <= phases, set(stages.phases()) - phases
    assert {f["expect"]["health"] for f in recorded} == set(HEALTH)
    # The states the rules single out, each from code.
    assert {"edit-while-serving-training", "edit-while-serving-gate-failed", "revert-rolling-out", "scaled-to-zero",
            "queued", "deploying-secret-missing", "generation-not-observed", "refused-spec"} <= {p.stem for p in RECORDED}


def promoted_state(path: Path) -> tuple[str, str] | None:
    found = [(c["status"], c["reason"]) for c in load(path)["object"]["status"].get("conditions") or []
             if c["type"] == "Promoted"]
    assert len(found) <= 1, path.name
    return found[0] if found else None


def test_every_rollout_state_is_recorded_from_the_code():
    from_code = {promoted_state(p) for p in RECORDED} - {None}
    assert ROLLOUT_STATES <= from_code, ROLLOUT_STATES - from_code


def test_numbers_reach_the_script_as_floats_as_in_argo_cd():
    # Argo CD's Lua has one number type (float64): the script must not print "generation 2.0".
    assert lua.to_lua({"generation": 2}) == '{["generation"] = 2.0}'
    answer_of_unseen = FIXTURES["generation-not-observed"]["expect"]["message"]
    assert answer_of_unseen == ["waiting for the operator to observe generation 2"]


def test_the_converter_hands_lua_the_json_object(lua_bin):
    obj = {"metadata": {"name": 'q"uote\\back\nslash', "labels": {"k": "é ✓ 模型"}},
           "status": {"conditions": [{"type": "Ready", "status": "True"}, {"type": "Stalled"}],
                      "progress": {"percent": 42, "loss": 1.25e-3}, "endpoint": None, "ok": False},
           "spec": {"list": [1, 2.5, "three", [True]]}}
    echoed = lua.run(lua_bin, None, {"obj": obj})["obj"]["object"]
    expected = copy.deepcopy(obj)
    del expected["status"]["endpoint"]  # JSON null: absent in Lua, as in Argo CD
    assert echoed == expected


def test_the_harness_sandbox_has_only_what_argo_cd_opens(lua_bin, tmp_path):
    # Argo CD (util/lua runLua, useOpenLibs false) opens base and table only: no string, no math.
    for library in ("string.format('%d', 1)", "math.floor(1.5)", "('x'):upper()", "os.getenv('HOME')",
                    "io.write('x')", "require('os')", "load('return 1')()"):
        script = tmp_path / "probe.lua"
        script.write_text(f"local x = {library}\nreturn {{status = 'Healthy', message = 'escaped'}}\n")
        answer = lua.run(lua_bin, script, {"probe": {"status": {}}})["probe"]
        assert "error" in answer and re.search(r"nil value|attempt to index a string value", answer["error"]), (
            library, answer)
    script = tmp_path / "probe.lua"
    script.write_text("return {status = 'Healthy', message = table.concat({'base', 'and', 'table'}, ' ')}\n")
    assert lua.run(lua_bin, script, {"probe": {}})["probe"] == {"status": "Healthy", "message": "base and table"}


def test_the_script_is_lua_5_1_with_base_and_table_only(lua_bin):
    """Argo CD's interpreter is Lua 5.1 (gopher-lua): nothing of 5.2+ may appear outside strings
    and comments (tested with 5.4, which accepts both), and no library Argo CD does not open."""
    code = record.HEALTH_LUA.read_text()
    code = re.sub(r"--[^\n]*", "", code)
    code = re.sub(r'"(\\.|[^"\\])*"', '""', code)
    for pattern in (r"\bgoto\b", "::", "//", r"<const>", r"<close>", r"\butf8\.", r"table\.move", r"table\.unpack",
                    r"\bload\(", "&", r"\|", "<<", ">>", r"~(?!=)",
                    r"\bstring\.", r"\bmath\.", r"\bos\.", r"\bio\.", r"\brequire\b", r"[\w)\]\"]\s*:\s*\w+\s*[(\"{]"):
        assert not re.search(pattern, code), pattern


def test_the_chart_ships_the_script_with_its_configmap_key():
    doc = (record.ROOT / "charts/kubetune/files/README.md").read_text()
    assert f"{record.HEALTH_KEY}: |" in doc and "argocd.healthCheck" in doc
    guide = (record.ROOT / "docs/gitops.md").read_text()
    for fixture in ("edit-while-serving-training", "edit-while-serving-gate-failed", "edit-while-serving-canary-failed"):
        assert fixture in guide, f"docs/gitops.md names the fixture {fixture}"


def test_without_lua_and_without_root_the_tests_fail_saying_what_to_install(monkeypatch):
    monkeypatch.setattr(lua.shutil, "which", lambda name: None)
    monkeypatch.setattr(lua.os, "geteuid", lambda: 1000)
    with pytest.raises(RuntimeError, match=r"apt-get install -y lua5\.4"):
        lua.ensure_lua()


# Flux reads the same objects with kstatus; it agrees with Argo CD's health but where the two part ways
# (docs/gitops.md, "Flux").
KSTATUS_OF_HEALTH = {"Healthy": "Current", "Progressing": "InProgress", "Degraded": "Failed", "Suspended": "InProgress"}
KSTATUS_DIFFERS = {
    # kstatus has no "healthy, still working": an edit while serving is InProgress (Reconciling=True)
    # until the rollout ends, where Argo CD reads Healthy.
    **dict.fromkeys(["edit-while-serving-training", "edit-while-serving-training-starts", "edit-while-serving-queued",
                     "edit-while-serving-evaluating", "edit-while-serving-rolling-out", "revert-rolling-out"],
                    "InProgress"),
    # The revision that served stopped answering while the next is built: Argo CD reads Degraded (nothing
    # serves), kstatus InProgress (Reconciling: the next revision may well replace it without a person).
    "edit-after-serving-stopped": "InProgress",
    # Just applied, no status at all: kstatus has nothing to wait on (the operator's first patch sets
    # Reconciling=True).
    "applied": "Current",
}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_kstatus_reads_the_same_objects_as_documented(name):
    fixture = FIXTURES[name]
    expected = KSTATUS_DIFFERS.get(name, KSTATUS_OF_HEALTH[fixture["expect"]["health"]])
    assert kstatus.compute(fixture["object"]) == expected


def test_the_kstatus_transcription_follows_its_rules():
    def obj(generation=2, observed=2, **conditions):
        return {"metadata": {"generation": generation},
                "status": {"observedGeneration": observed,
                           "conditions": [{"type": t, "status": v} for t, v in conditions.items()]}}

    assert kstatus.compute(obj(observed=1, Stalled="True")) == "InProgress"  # the generation first
    assert kstatus.compute(obj(Reconciling="True", Stalled="False")) == "InProgress"
    assert kstatus.compute(obj(Reconciling="False", Stalled="True")) == "Failed"
    assert kstatus.compute(obj(Ready="False", Reconciling="False", Stalled="False")) == "Current"  # Ready is not read
    assert kstatus.compute({"metadata": {"generation": 1, "deletionTimestamp": "2026-01-01T00:00:00Z"}}) == "Terminating"
    assert set(KSTATUS_DIFFERS) <= set(FIXTURES)


def test_argo_cds_own_lua_gives_the_same_answers(health, gopherlua):
    """gopher-lua (Lua 5.1, every number a float64, base and table only) agrees with lua5.4 on every object."""
    assert lua.run_gopherlua(gopherlua, record.HEALTH_LUA, all_objects()) == health


def test_argo_cds_own_lua_opens_no_string_or_math_library(gopherlua, tmp_path):
    for library in ("string.format('%d', 1)", "math.floor(1.5)", "('x'):upper()"):
        script = tmp_path / "probe.lua"
        script.write_text(f"local x = {library}\nreturn {{status = 'Healthy', message = 'escaped'}}\n")
        answer = lua.run_gopherlua(gopherlua, script, {"probe": {"status": {}}})["probe"]
        assert "error" in answer and "status" not in answer, (library, answer)
