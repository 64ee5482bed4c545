"""bench/gpu.py, the one-command GPU benchmark: its --smoke run (every stage at toy sizes on the CPU,
the kernels through Triton's interpreter) completes with every stage ok and a well-formed JSON; a stage
that runs past its budget is cut and one that raises is reported with its error."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_gpu_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module
    spec.loader.exec_module(module)
    return module


def numbers(value):
    """Every float inside a JSON value."""
    if isinstance(value, float):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers(v)


def table(stage):
    return [r for r in stage["rows"] if "note" not in r]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_bench") / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    return proc, json.loads(out.read_text()) if out.exists() else None


@pytest.mark.slow
def test_smoke_runs_every_stage(smoke):
    proc, report = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    gpu = load_gpu_bench()
    assert [s["name"] for s in report["stages"]] == [s.name for s in gpu.STAGES]
    for stage in report["stages"]:
        assert stage["status"] == "ok", (stage["name"], stage["note"])
        assert table(stage), stage["name"]
    assert all(math.isfinite(x) for x in numbers(report))
    assert report["smoke"] is True and report["total_s"] > 0
    assert "== summary" in proc.stdout and "kernel_check" in proc.stdout


@pytest.mark.slow
def test_smoke_json_holds_the_measurements(smoke):
    _, report = smoke
    stages = {s["name"]: s for s in report["stages"]}
    env = {r["key"]: r["value"] for r in table(stages["env"])}
    assert {"device", "torch", "triton", "cuda (torch build)", "triton.testing.do_bench"} <= set(env)
    assert env["triton interpreter"] == "on"
    assert {r["split"] for r in table(stages["data"])} == {"train", "val"}

    compiled = table(stages["compile"])
    assert compiled and all(r.get("error") is None for r in compiled), compiled
    assert {r["kernel"] for r in compiled} == {"fwd", "ln_fwd", "ln_bwd"}

    checks = table(stages["kernel_check"])
    assert all(r["pass"] is True for r in checks)
    names = [r["check"] for r in checks]
    assert names[:3] == ["attention gqa", "attention gqa docs=5", "attention docs=3 p=0.3"]  # the modern ones first
    assert any(n.startswith("attention tuned") for n in names)
    attention = [r for r in checks if r["check"].startswith("attention")]
    assert {r["dtype"] for r in attention} == {"bf16", "fp16", "fp32"}
    assert {r["shape"].split()[-1] for r in attention} == {"D64", "D128"}
    assert any("p=" in r["check"] for r in attention) and any(r["check"].startswith("dropout") for r in checks)
    assert {r["dtype"] for r in checks if r["check"] == "layernorm"} == {"bf16", "fp16", "fp32"}
    for r in attention:
        assert r["out_rel"] >= 0 and r["grad_rel"] >= 0 and r["tol"]

    speed = table(stages["attention_speed"])
    assert {r["mode"] for r in speed} == {"fwd", "bwd", "fwd+bwd"}
    assert {r["variant"] for r in speed} == {"mha", "gqa2", "gqa2 docs=4"}  # smoke: 2 heads, so 2 per kv head
    mha = [r for r in speed if r["variant"] == "mha"]
    assert all(r["ours"] > 0 and r["sdpa_flash"] > 0 and r["ours_vs_flash"] > 0 and r["tuned"] for r in mha)
    assert all(r["ours"] > 0 and r["sdpa"] > 0 for r in speed if r["variant"] != "mha")
    assert any("sdpa_cudnn" in r.get("note", "") for r in stages["attention_speed"]["rows"])  # no cuDNN on CPU
    ln = table(stages["layernorm_speed"])
    assert all(r["ours"] > 0 and r["torch"] > 0 and r["compiled"] > 0 for r in ln)
    assert any(r.get("copy_gbs", 0) > 0 for r in stages["layernorm_speed"]["rows"])

    eager = table(stages["e2e_eager"])
    assert {(r["attention"], r["layernorm"]) for r in eager} == {
        ("sdpa", "torch"), ("sdpa", "triton"), ("triton", "torch"), ("triton", "triton")}
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["loss"]) for r in eager)
    assert all(r["mode"] == "compiled" and r["tokens_per_s"] > 0 for r in table(stages["e2e_compiled"]))

    big = table(stages["train_1p3b"])
    assert big[0]["source"].startswith("measured") and big[1]["source"].startswith("planner")
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_gb"] > 0 for r in big)

    progress = [r for r in stages["quickstart_200"]["rows"] if "step" in r]
    assert progress and all(math.isfinite(r["triton_loss"]) for r in progress)  # written while it trains
    runs = table(stages["quickstart_200"])
    assert [r["path"] for r in runs][:2] == ["triton", "sdpa"]
    assert runs[-1]["pass"] is True and runs[-1]["last50_mean_loss"] < 0.05


def test_budgets_fit_the_window():
    gpu = load_gpu_bench()
    assert sum(s.budget_s for s in gpu.STAGES) < 450 <= gpu.TOTAL_LIMIT_S
    assert len({s.name for s in gpu.STAGES}) == len(gpu.STAGES)
    assert gpu.STAGES[0].name == "compile"  # before any stage that launches a kernel


def test_plan_fits_eight_minutes_on_sixteen_cores(tmp_path):
    """--plan from the kept sm_90 compile table: every stage listed, the total within 8 minutes."""
    table = ROOT / "bench" / "_gpu" / "compile_sm90.json"  # measured by bench/compile.py, kept
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--plan", "--compile-table", str(table)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    gpu = load_gpu_bench()
    for stage in gpu.STAGES:
        assert any(line.split()[:1] == [stage.name] for line in lines), stage.name
    total = next(line for line in lines if line.startswith("total "))
    assert "fits" in total and float(total.split()[1]) <= 480


def test_a_stage_past_its_budget_is_cut(tmp_path):
    gpu = load_gpu_bench()
    work, logs = tmp_path / "work", tmp_path / "logs"
    work.mkdir()
    logs.mkdir()
    result = gpu.launch(gpu.BY_NAME["data"], 0.5, True, work, logs)  # importing torch alone takes longer
    assert result["status"] == "cut" and result["note"].startswith("cut after")
    assert result["rows"] == []


def test_a_stage_that_raises_is_reported_with_its_error(tmp_path):
    gpu = load_gpu_bench()

    def broken(ctx):
        yield dict(step=1, value=2.0)
        raise ValueError("the kernel fell over\nsecond line")

    out = tmp_path / "part.json"
    stage = gpu.Stage("broken", 1, 1, broken, "raises")
    assert gpu.run_stage(stage, gpu.Ctx(smoke=True, work=tmp_path), out) == 1
    part = json.loads(out.read_text())
    assert part["status"] == "crashed" and part["error"] == "ValueError: the kernel fell over"
    assert part["rows"] == [dict(step=1, value=2.0)]  # what it measured before the error is kept


def test_table_format():
    gpu = load_gpu_bench()
    text = gpu.format_table([dict(name="a", tflops=351.26, ratio=0.8512, err=3.2e-6, ok=None, **{"pass": True}),
                             dict(name="bb", tflops=None, extra=1_234_567, **{"pass": False}),
                             dict(note="device copy 2950 GB/s")])
    lines = text.splitlines()
    assert lines[0].split() == ["name", "tflops", "ratio", "err", "ok", "pass", "extra"]
    assert lines[1].split() == ["a", "351", "0.851", "3.2e-06", "-", "pass", "-"]
    assert lines[2].split() == ["bb", "-", "-", "-", "-", "FAIL", "1,234,567"]
    assert lines[3] == "  note: device copy 2950 GB/s"
