"""The GPU benchmark harness itself, on a CPU with a tiny model: it must still run the
trainer's real code path, under the operator's own launch line, and record what the
results file promises (the GPU figures come from the same code)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer

BENCH = Path(__file__).resolve().parents[2] / "bench" / "run.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_harness_runs_two_processes_under_the_operator_launch_line(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--cases", "cpu-smoke", "--steps", "5", "--warmup", "1", "--rows", "200",
         "--model-dir", str(tmp_path / "model"), "--work", str(tmp_path / "work"), "--out", str(out),
         "--launch", "accelerate", "--gpus", "2", "--strategy", "ddp", "--port", str(_free_port()),
         "--profile-step", "3", "--profile-span", "2", "--logs", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    case = record["results"][0]
    assert case["case"] == "cpu-smoke" and not case.get("failed")
    assert case["world_size"] == 2 and case["strategy"] == "ddp"
    assert "--num_processes 2" in case["launch"] and "--multi_gpu" in case["launch"] and "127.0.0.1" in case["launch"]
    assert len(case["peak_gib_train_per_rank"]) == 2 and len(case["tokens_per_s_per_rank"]) == 2
    # the profiled steps (3 and 4, one window) are left out of the median
    assert case["steps"] == 5 and case["steady_steps"] == 2 and case["tokens_per_s"] > 0
    assert case["profile"]["step"] == 3 and case["profile"]["span"] == 2 and case["profile"]["wall_s"] > 0
    assert case["profile"]["gpu_gaps"]["count"] == 0  # a CPU run: no kernels, no gaps
    table = (tmp_path / "logs" / "profile_cpu-smoke.txt").read_text()
    assert table.startswith("steps 3-4:") and "BY INPUT SHAPE" in table and "aten::mm" in table
    assert (tmp_path / "logs" / "profile_cpu-smoke.trace.json.gz").stat().st_size > 0
    assert sorted(case["loss"], key=int) == ["1", "2", "3", "4", "5"]
    assert all(v > 0 for v in case["loss"].values())
    assert case["config"]["launch"]["strategy"] == "ddp"
    assert (tmp_path / "logs" / "cpu-smoke.log").is_file()


def test_loss_check_pairs_each_variant_with_its_case():
    sys.path.insert(0, str(BENCH.parent))
    from run import loss_checks

    results = [
        {"case": "qlora-instruct", "loss": {"1": 2.0, "2": 1.5, "3": 1.0}},
        {"case": "qlora-instruct@plain", "loss": {"1": 2.0, "2": 1.6, "3": 1.0}},
        {"case": "qlora-instruct@compile", "loss": {"2": 1.5, "3": 1.25}},
        {"case": "lora-instruct@plain", "loss": {"1": 9.0}},  # no base case ran: nothing to compare
        {"case": "qlora-long@plain", "failed": True},
        {"case": "qlora-ctx16384@b9.6", "loss": {"1": 5.0}},
        {"case": "qlora-ctx16384@b9.6+keepattn", "loss": {"1": 5.5}},  # against @b9.6: what keepattn adds
        {"case": "qlora-instruct@bf16+keepattn", "loss": {"1": 2.5}},  # no @bf16 ran: against the plain case
        # no plain qlora-learn: each variant against the bf16 products' run
        {"case": "qlora-learn@bf16", "loss": {"1": 4.0, "2": 3.0}},
        {"case": "qlora-learn@fastgrad", "loss": {"1": 4.0, "2": 3.03}},
    ]
    out = loss_checks(results)
    assert set(out) == {"qlora-instruct@plain", "qlora-instruct@compile", "qlora-ctx16384@b9.6+keepattn",
                        "qlora-instruct@bf16+keepattn", "qlora-learn@fastgrad"}
    assert out["qlora-ctx16384@b9.6+keepattn"]["first"] == [5.0, 5.5]
    assert out["qlora-ctx16384@b9.6+keepattn"]["against"] == "qlora-ctx16384@b9.6"
    assert out["qlora-instruct@bf16+keepattn"]["first"] == [2.0, 2.5]
    assert out["qlora-instruct@bf16+keepattn"]["against"] == "qlora-instruct"
    assert out["qlora-learn@fastgrad"]["against"] == "qlora-learn@bf16"
    assert out["qlora-learn@fastgrad"]["max_abs_diff"] == 0.03 and out["qlora-learn@fastgrad"]["max_rel_diff"] == 0.0099
    assert out["qlora-instruct@plain"]["steps"] == 3 and out["qlora-instruct@plain"]["max_abs_diff"] == 0.1
    assert out["qlora-instruct@compile"] == {"against": "qlora-instruct", "steps": 2, "max_abs_diff": 0.25, "max_rel_diff": 0.2,
                                             "first": [1.5, 1.5], "last": [1.0, 1.25]}


# ---------------------------------------------------------------- Unsloth beside the cases (issue 16)

def _bench_module(name: str):
    sys.path.insert(0, str(BENCH.parent))
    import importlib

    return importlib.import_module(name)


def _touch_wheels(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"")


def test_unsloth_install_target_takes_its_own_pins_and_only_the_shared_wheels_it_lacks(tmp_path):
    run = _bench_module("run")
    shared, own = tmp_path / "whl", tmp_path / "whl" / "unsloth"
    _touch_wheels(shared, ["trl-1.16.0-py3-none-any.whl", "datasets-5.2.0-py3-none-any.whl",
                           "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl", "pydantic-2.14.4-py3-none-any.whl",
                           "pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.whl", "dill-0.4.1-py3-none-any.whl",
                           "kubetune-0.1.0-py3-none-any.whl", "liger_kernel-0.8.5-py3-none-any.whl"])
    _touch_wheels(own, ["unsloth-2026.10.9-py3-none-any.whl", "unsloth_zoo-2026.10.9-py3-none-any.whl",
                        "trl-1.15.0-py3-none-any.whl", "datasets-4.8.5-py3-none-any.whl", "Nest_Asyncio-1.6.0-py3-none-any.whl"])
    cmd = run.unsloth_install_cmd("python3", own, shared, "/tmp/site-unsloth")
    files = [Path(c).name for c in cmd if c.endswith(".whl")]
    assert cmd[cmd.index("--target") + 1] == "/tmp/site-unsloth" and "--no-deps" in cmd and "--no-index" in cmd
    # its own trl/datasets pins, never the cases' (a second version would also stop pip)
    assert "trl-1.15.0-py3-none-any.whl" in files and "trl-1.16.0-py3-none-any.whl" not in files
    assert "datasets-4.8.5-py3-none-any.whl" in files and "datasets-5.2.0-py3-none-any.whl" not in files
    # what it shares with the cases: bitsandbytes and pydantic; not the project nor Liger
    assert {"bitsandbytes", "pydantic", "pydantic_core", "dill"} <= {run.wheel_name(f) for f in files}
    assert not {"kubetune", "liger_kernel"} & {run.wheel_name(f) for f in files}
    names = [run.wheel_name(f) for f in files]
    assert len(names) == len(set(names)) and "nest_asyncio" in names
    _touch_wheels(own, ["trl-1.14.0-py3-none-any.whl"])
    with pytest.raises(ValueError, match="trl"):
        run.unsloth_install_cmd("python3", own, shared, "/tmp/site-unsloth")
    with pytest.raises(FileNotFoundError):
        run.unsloth_install_cmd("python3", tmp_path / "none", shared, "/tmp/site-unsloth")


def test_unsloth_process_sees_only_its_own_target_and_its_recipe_accepts_the_harness_arguments(tmp_path):
    run = _bench_module("run")
    recipe = _bench_module("unsloth_recipe")
    env = run.unsloth_env({"PYTHONPATH": "/tmp/site", "PATH": "/usr/bin", "HF_TOKEN": "x"}, "/tmp/site-unsloth")
    assert env["PYTHONPATH"] == "/tmp/site-unsloth"  # the cases' /tmp/site (trl 1.16, datasets 5) is not on it
    assert env["UNSLOTH_DISABLE_STATISTICS"] == "1" and env["HF_HUB_OFFLINE"] == "1" and env["PATH"] == "/usr/bin"
    assert run.parse_unsloth("8x1,2x4") == [(8, 1, "qlora-instruct"), (2, 4, "qlora-instruct")]
    assert run.parse_unsloth("") == []
    # long context: Unsloth on a long-context case's data and maxLength
    assert run.parse_unsloth("1x1:qlora-ctx32768") == [(1, 1, "qlora-ctx32768")]
    assert run.unsloth_name(1, 1, "qlora-ctx32768") == "unsloth-1x1-qlora-ctx32768"
    assert run.unsloth_name(8, 1, "qlora-instruct") == "unsloth-8x1"
    for bad in ("8", "8x", "x1", "0x1", "8x1x2", "ax1", "1x1:lora-instruct", "1x1:nothing", "1x1:qlora-ctx12"):
        with pytest.raises(ValueError):
            run.parse_unsloth(bad)
    cmd = run.unsloth_cmd("python3", BENCH.parent / "unsloth_recipe.py", tmp_path / "models" / "unsloth-8x1",
                          tmp_path / "instruct.jsonl", 8, 1, 30, 3, 42, 2048, "q_proj,k_proj,v_proj,o_proj",
                          tmp_path / "r.json", tmp_path / "out", 10)
    a = recipe.parser().parse_args(cmd[2:])  # the real recipe's parser takes exactly what the harness builds
    assert (a.batch, a.accum, a.steps, a.warmup, a.seed, a.max_length, a.log_every) == (8, 1, 30, 3, 42, 2048, 10)
    assert a.model_dir == str(tmp_path / "models" / "unsloth-8x1") and a.result == str(tmp_path / "r.json")


def test_model_fingerprint_and_copies(tmp_path):
    run = _bench_module("run")
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"a": 1}')
    (src / "model.safetensors").write_bytes(bytes(range(256)) * (3 * 2**20 // 256 + 1) * 30)  # > 64 MiB: head/tail hash
    fp = run.fingerprint(src)
    secs, copied = run.copy_model(src, tmp_path / "a" / "b", fp)
    assert run.model_changes(fp, copied, mtimes=False) == [] and secs >= 0
    (tmp_path / "a" / "b" / "config.json").write_text('{"a": 2}')
    (tmp_path / "a" / "b" / "extra.bin").write_bytes(b"1")
    assert run.model_changes(copied, run.fingerprint(tmp_path / "a" / "b")) == ["added extra.bin", "changed config.json"]
    assert run.model_changes(fp, run.fingerprint(src)) == []  # the source is untouched by its copy's change
    # a source altered since it was made is never copied on
    (src / "config.json").write_text('{"a": 3}')
    with pytest.raises(RuntimeError, match="changed since it was made"):
        run.copy_model(src, tmp_path / "c", fp)
    with pytest.raises(ValueError):
        run.copy_model(src, src, run.fingerprint(src))
    script = tmp_path / "ref.py"
    script.write_text('import os\nMODEL_DIR = "/tmp/llama8b-rand"\nVOCAB = 1\n')
    assert run.reference_model_dir(script) == Path("/tmp/llama8b-rand")
    script.write_text("MODEL_DIR = os.environ['X']\n")
    with pytest.raises(ValueError):
        run.reference_model_dir(script)


STUB_REFERENCE = '''import json, os, sys
from pathlib import Path
MODEL_DIR = "{model_dir}"
files = sorted(p.name for p in Path(MODEL_DIR).iterdir())
# a reference that alters the folder it was given: the harness must see it, and no other recipe may
(Path(MODEL_DIR) / "tokenizer_config.json").write_text("{{}}")
(Path(MODEL_DIR) / "written-by-reference.txt").write_text("x")
print("RESULT " + json.dumps(dict(name="padfree_pack", tokens_per_s=100, peak_mem_gib=1.0, mfu_4N_vs_989TF=0.01,
                                  files=files, argv=sys.argv[1:])), flush=True)
'''

STUB_UNSLOTH = '''import json, os, sys
from pathlib import Path
sys.path.insert(0, "{bench}")
from unsloth_recipe import parser
a = parser().parse_args()
model = Path(a.model_dir)
rows = Path(a.data).read_text().splitlines()
res = dict(name=f"unsloth_{{a.batch}}x{{a.accum}}", tokens_per_s=50, peak_gib_train=1.0, peak_gib_load=0.5, peak_mem_gib=1.0,
           mfu_4N_vs_989TF=0.005, ttfs=dict(process_start_to_first_step_s=1.0), pythonpath=os.environ.get("PYTHONPATH"),
           cwd=os.getcwd(), files=sorted(p.name for p in model.iterdir()), rows=len(rows),
           tokenizer_config=(model / "tokenizer_config.json").read_text())
Path(a.result).write_text(json.dumps(res))
'''


def test_long_context_cases_name_their_length():
    run = _bench_module("run")
    assert run.case_spec("qlora-ctx16384") == ("qlora", "longctx", 16384)
    assert run.case_spec("qlora-instruct") == ("qlora", "instruct", 2048)
    for bad in ("qlora-ctx", "qlora-ctxabc", "qlora-ctx100", "lora-ctx4096"):
        with pytest.raises(KeyError):
            run.case_spec(bad)
    cfg = run.trainer_config("qlora-ctx32768", "/m", "/d.jsonl", "/o", 10, "auto", 42, variant="allgc-b80",
                             qlora_budget_gib=15.6)
    assert cfg["dataset"]["maxLength"] == 32768 and cfg["method"]["type"] == "qlora"
    # the variant's budget wins over the QLoRA cases' default one
    assert cfg["training"]["performance"] == {"memoryBudgetGiB": 80, "selectiveCheckpointing": "off"}
    synthetic = _bench_module("synthetic")
    lengths = synthetic.row_lengths(2000, "longctx", 0)
    assert min(lengths) >= 1024 and max(lengths) <= 32768 and 4000 < sorted(lengths)[1000] < 8000
    assert synthetic.SHAPES["8b-128k"]["max_position_embeddings"] == 131072


def test_harness_gives_each_recipe_its_own_model_folder_and_unsloth_its_own_target(tmp_path):
    """The whole parent flow on a CPU without a case: the model made once, the reference
    recipe and Unsloth (stand-ins with the real scripts' interfaces) each on a fresh copy
    in its own folder; the reference alters its copy, which is recorded and reaches
    neither the cases' folder nor Unsloth's."""
    ref_dir, site = tmp_path / "refmodel", tmp_path / "site-unsloth"
    site.mkdir()
    ref = tmp_path / "ref" / "reference_recipe.py"
    ref.parent.mkdir()
    ref.write_text(STUB_REFERENCE.format(model_dir=ref_dir))
    stub = tmp_path / "unsloth_stub.py"
    stub.write_text(STUB_UNSLOTH.format(bench=BENCH.parent))
    out, work, model = tmp_path / "out", tmp_path / "work", tmp_path / "model"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--cases", "", "--rows", "50", "--model-dir", str(model),
         "--work", str(work), "--out", str(out), "--logs", str(tmp_path / "logs"), "--reference", "pf",
         "--reference-script", str(ref), "--unsloth", "8x1,2x4", "--unsloth-script", str(stub),
         "--unsloth-site", str(site), "--unsloth-wheels", "", "--log-every", "10", "--deadline-s", "500"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    # rc 1: the reference altered its folder, which the harness reports as a failure of the run
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "reference CHANGED its model folder" in proc.stdout
    record = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    run_info = record["reference_run"]
    assert run_info["rc"] == 0 and run_info["model_dir"] == str(ref_dir)
    assert run_info["model_dir_changes"] == ["added written-by-reference.txt", "changed tokenizer_config.json"]
    assert not ref_dir.exists()  # removed after it ran (disk: a copy of the 8B model is 16 GB)
    (r,) = record["reference"]
    assert "config.json" in r["files"] and "tokenizer.json" in r["files"] and r["argv"] == ["pf"]
    assert record["model"]["changes_at_end"] == [] and record["model"]["dir"] == str(model)
    assert [u["name"] for u in record["unsloth"]] == ["unsloth_8x1", "unsloth_2x4"]
    for u, setting in zip(record["unsloth"], ("8x1", "2x4")):
        assert not u.get("failed") and u["rc"] == 0
        assert u["model_dir"] == str(work / "models" / f"unsloth-{setting}")
        assert u["pythonpath"] == str(site)  # only its own install target
        assert u["cwd"] == str(work / f"unsloth-{setting}")
        assert "written-by-reference.txt" not in u["files"] and "tokenizer.json" in u["files"]
        assert u["tokenizer_config"] != "{}" and u["model_dir_changes"] == []
        assert u["rows"] == 50 and u["data"]["rows"] == 50 and u["data"]["profile"] == "instruct"
    assert record["unsloth_vs_reference"] == {"unsloth_8x1/padfree_pack": 0.5, "unsloth_2x4/padfree_pack": 0.5}
    assert record["ratio_vs_unsloth"] == {}  # no case ran
    assert (tmp_path / "logs" / "reference.log").is_file() and (tmp_path / "logs" / "unsloth-8x1.log").is_file()


def test_before_variant_runs_the_old_code_with_a_fresh_triton_cache(tmp_path):
    """@before puts --before-site first on the case's PYTHONPATH; --fresh-triton-cache gives
    every case an empty cache of its own (the time-to-first-step comparison, issue 16)."""
    site = tmp_path / "before-site"
    (site / "kubetune_before_marker").mkdir(parents=True)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--cases", "cpu-smoke,cpu-smoke@before", "--steps", "4", "--warmup", "1",
         "--rows", "120", "--model-dir", str(tmp_path / "model"), "--work", str(tmp_path / "work"), "--out", str(out),
         "--before-site", str(site), "--fresh-triton-cache", "--log-every", "2"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after, before = json.loads((out / "results.jsonl").read_text().splitlines()[-1])["results"]
    assert before["case"] == "cpu-smoke@before" and before["pythonpath"].split(":")[0] == str(site)
    assert (after["pythonpath"] or "").split(":")[0] != str(site)
    assert after["triton_cache_dir"] != before["triton_cache_dir"]
    assert before["triton_cache_dir"].endswith("triton-cpu-smoke_before")


def test_prequantised_model_loads_as_if_quantised_at_load(tmp_path):
    """70B QLoRA on one GPU (issue 16 item 4): the random model is written already
    quantised. Loaded through from_pretrained it must give the same module tree and the
    same quantised tensors as the bf16 model of the same seed quantised by transformers
    at load (on a CPU, tiny shape)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    synthetic = _bench_module("synthetic")
    bf16, nf4 = tmp_path / "bf16", tmp_path / "nf4"
    synthetic.make_model(bf16, tiny=True)
    assert synthetic.make_model_nf4(nf4, shape="tiny") > 0
    assert synthetic.make_model_nf4(nf4, shape="tiny") == 0  # made once
    conf = json.loads((nf4 / "config.json").read_text())["quantization_config"]
    assert conf["load_in_4bit"] and conf["bnb_4bit_quant_type"] == "nf4" and conf["bnb_4bit_use_double_quant"]
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)  # what the trainer passes for QLoRA
    kw = dict(dtype=torch.bfloat16, device_map={"": "cpu"}, quantization_config=qc)
    at_load = AutoModelForCausalLM.from_pretrained(bf16, **kw).state_dict()
    pre = AutoModelForCausalLM.from_pretrained(nf4, **kw).state_dict()
    assert sorted(pre) == sorted(at_load)
    assert any(k.endswith("q_proj.weight.nested_absmax") for k in pre)  # quantised, with its state
    assert pre["lm_head.weight"].dtype == torch.bfloat16  # the head stays bf16
    for k in at_load:
        assert torch.equal(pre[k], at_load[k]), k
    # a quarter of the bf16 projections' bytes on disk, plus their states
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    assert size(nf4) < size(bf16)


def test_references_regenerate_the_model_where_the_disk_holds_one_copy(tmp_path):
    """--reference-models regenerate (the 70B model written quantised, 37 GB on a 64 GiB
    disk): after the cases, the cases' folder is removed and each reference gets the model
    written again from the same seed in its own folder, checked equal to the first."""
    site = tmp_path / "site-unsloth"
    site.mkdir()
    stub = tmp_path / "unsloth_stub.py"
    stub.write_text(STUB_UNSLOTH.format(bench=BENCH.parent))
    out, work, model = tmp_path / "out", tmp_path / "work", tmp_path / "model"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--tiny", "--model-shape", "8b-nf4", "--cases", "", "--rows", "50",
         "--model-dir", str(model), "--work", str(work), "--out", str(out), "--unsloth", "8x1,2x4",
         "--unsloth-script", str(stub), "--unsloth-site", str(site), "--unsloth-wheels", "",
         "--reference-models", "regenerate", "--log-every", "10", "--deadline-s", "500"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "results.jsonl").read_text().splitlines()[-1])
    assert record["model"]["reference_models"] == "regenerate" and record["model"]["changes_at_end"] == []
    assert not model.exists()  # made way for the references' folders
    for u in record["unsloth"]:
        assert not u.get("failed") and u["model_regenerated_s"] >= 0 and u["model_dir_changes"] == []
        assert any(f.endswith(".safetensors") for f in u["files"]) and "config.json" in u["files"]
    run = _bench_module("run")
    synthetic = _bench_module("synthetic")
    first = tmp_path / "first"
    synthetic.make_model_nf4(first, shape="tiny")
    fp = run.fingerprint(first)
    secs, again = run.regenerate_model(first, tmp_path / "again", fp, lambda d: synthetic.make_model_nf4(d, shape="tiny"))
    assert not first.exists() and run.model_changes(fp, again, mtimes=False) == []
    with pytest.raises(RuntimeError, match="differs"):  # a maker that writes another model is refused
        run.regenerate_model(tmp_path / "none", tmp_path / "other", fp, lambda d: synthetic.make_model(d, tiny=True))


def test_unsloth_mfu_counts_the_model_it_trained(tmp_path):
    """Unsloth's MFU uses the N of the model in its folder (it was fixed at the 8B's 7.5e9:
    a 70B run read 0.035 instead of 0.329), the same count as the cases' MFU."""
    import types

    run = _bench_module("run")
    recipe = _bench_module("unsloth_recipe")
    synthetic = _bench_module("synthetic")
    for shape in ("8b", "70b"):
        cfg = synthetic.SHAPES[shape]
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        assert recipe.matmul_params(tmp_path) == run.matmul_params(types.SimpleNamespace(**cfg))
    assert recipe.matmul_params(tmp_path) == 69501714432.0  # the 70B record's model_matmul_params


def test_host_waits_name_the_ops_each_sync_ran_in():
    from types import SimpleNamespace as Ev

    run = _bench_module("run")
    index = Ev(name="aten::index", cpu_parent=None)
    nonzero = Ev(name="aten::nonzero", cpu_parent=index)
    item = Ev(name="aten::item", cpu_parent=None)
    events = [index, nonzero, Ev(name="cudaStreamSynchronize", cpu_parent=nonzero), Ev(name="cudaLaunchKernel", cpu_parent=nonzero),
              Ev(name="cudaStreamSynchronize", cpu_parent=item), Ev(name="cudaStreamSynchronize", cpu_parent=None)]
    assert run.host_waits(events) == ["aten::nonzero < aten::index", "aten::item", "(no enclosing op)"]


def test_gpu_gaps_name_the_kernels_and_host_ops_around_each_idle_interval():
    run = _bench_module("run")

    def kernel(name, ts, dur, corr):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}

    events = [
        kernel("a", 0, 10, 1), kernel("b", 5, 20, 2),  # overlapping: one busy interval 0-25
        kernel("c", 27, 3, 3),  # 2 us after: under the 5 us floor
        kernel("d", 130, 10, 4),  # 100 us idle before it
        kernel("e", 150, 10, 5),  # 10 us idle
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 120, "dur": 2, "tid": 1,
         "args": {"correlation": 4}},
        {"ph": "X", "cat": "cpu_op", "name": "collate", "ts": 20, "dur": 95, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 119, "dur": 5, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "LoraLinearFn", "ts": 118, "dur": 30, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "other thread", "ts": 119, "dur": 5, "tid": 2},
    ]
    gaps = run.gpu_gaps(events)
    assert gaps["count"] == 2 and gaps["total_us"] == 110.0 and gaps["span_us"] == 160.0
    first, second = gaps["largest"]
    assert (first["us"], first["at_ms"], first["after"], first["before"]) == (100.0, 0.03, "c", "d")
    assert first["launched_in"] == ["aten::mm", "LoraLinearFn"]  # innermost first, this thread only
    assert first["host_ops_through"] == ["collate"]  # the host op that ran through most of it
    assert (second["us"], second["before"], second["launched_in"]) == (10.0, "e", [])
    assert run.gpu_gaps([]) == {"total_us": 0.0, "count": 0, "largest": []}


def test_host_lead_shows_where_the_gpu_waited_for_launches():
    run = _bench_module("run")

    def kernel(ts, dur, corr):
        return {"ph": "X", "cat": "kernel", "name": "k", "ts": ts, "dur": dur, "args": {"correlation": corr}}

    def launched(ts, corr):
        return {"ph": "X", "cat": "cuda_driver", "name": "cuLaunchKernelEx", "ts": ts, "dur": 10, "args": {"correlation": corr}}

    # first 50 ms: each kernel starts right as its launch returns (host-bound, GPU half idle);
    # next 50 ms: launched 30 ms ahead, back to back
    events = [kernel(0, 20_000, 1), launched(-10, 1), kernel(30_000, 20_000, 2), launched(29_990, 2),
              kernel(50_000, 25_000, 3), launched(20_000, 3), kernel(75_000, 25_000, 4), launched(45_000, 4)]
    assert run.host_lead(events) == [{"at_ms": 0, "gpu_busy_ms": 40.0, "host_lead_ms": 0.0},
                                     {"at_ms": 50, "gpu_busy_ms": 50.0, "host_lead_ms": 30.0}]
    assert run.host_lead([]) == []


def test_variants_combine_config_fields_and_environment():
    run = _bench_module("run")
    assert run.variant_fields("b9.6+keepattn") == {"memoryBudgetGiB": 9.6}
    assert run.variant_env("b9.6+keepattn") == {"KUBETUNE_KEEP_ATTENTION": "1"}
    assert run.variant_fields("allgc-b80+bf16") == {"selectiveCheckpointing": "off", "memoryBudgetGiB": 80.0, "fp8": "off"}
    assert run.variant_env("expandable+keepattn") == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
                                                      "KUBETUNE_KEEP_ATTENTION": "1"}
    # a set count of uncheckpointed layers: environment only
    assert run.variant_fields("unckpt2+keepattn") == {}
    assert run.variant_env("unckpt2+keepattn") == {"KUBETUNE_UNCHECKPOINTED_LAYERS": "2", "KUBETUNE_KEEP_ATTENTION": "1"}
    # the plan's token cap: environment only
    assert run.variant_fields("tok20480") == {} and run.variant_env("tok20480+unckpt3") == {
        "KUBETUNE_MAX_AUTO_TOKENS": "20480", "KUBETUNE_UNCHECKPOINTED_LAYERS": "3"}
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        run.variant_fields("b9.6+nope")
    with pytest.raises(ValueError, match="unknown variant 'unckptx'"):
        run.variant_fields("unckptx")
