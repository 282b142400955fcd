"""benchmarks/gpu_check.py: the self-contained GPU check. Its smoke mode runs here on the CPU in a subprocess in
which Ray, nvseg_ray and the project's other dependencies cannot be imported (the GPU machine it targets has only
torch, monai and nibabel); full mode without CUDA refuses with a clear message and exit code 2."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"

#: What the script must not need. Setting a name to None in sys.modules makes importing it raise ImportError;
#: MONAI imports some of these opportunistically (optional_import) and copes with their absence.
BLOCKED = ("ray", "nvseg_ray", "benchmarks", "pydantic", "fsspec", "s3fs", "scipy", "pandas", "pyarrow", "yaml",
           "skimage", "pydicom", "fastapi", "starlette", "psutil")


def run_script(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """``gpu_check.py args`` in a fresh interpreter with :data:`BLOCKED` unimportable, outside the repository
    (so nothing of the project is on the path)."""
    code = (
        "import sys, runpy\n"
        f"for m in {BLOCKED!r}: sys.modules[m] = None\n"
        f"sys.argv = [{str(SCRIPT)!r}] + {args!r}\n"
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          cwd=tempfile.gettempdir(), env=_env())


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the test is about the CPU smoke mode even on a machine with a GPU
    return env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, subprocess.CompletedProcess, float]:
    out = tmp_path_factory.mktemp("gpu_check") / "smoke.json"
    t0 = time.perf_counter()
    proc = run_script(["--smoke", "--device", "cpu", "--json", str(out)])
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc, elapsed


def test_smoke_schema_and_timings(smoke):
    report, proc, elapsed = smoke
    assert elapsed < 120, f"smoke run took {elapsed:.0f} s"
    assert "Traceback" not in proc.stderr
    assert {"mode", "environment", "windows", "agreement", "volume", "skipped", "total_s"} <= set(report)
    assert report["mode"] == "smoke"
    assert 0 < report["total_s"] < 120

    env = report["environment"]
    for key in ("python", "torch", "torch_cuda", "cudnn", "monai", "nibabel", "numpy", "device", "tensorrt",
                "packages"):
        assert key in env, key
    assert env["device"] == "cpu" and env["monai"] and env["torch"]
    assert set(env["tensorrt"]) >= {"importable", "version"}
    assert not any(k in json.dumps(env).lower() for k in ("hostname", "uuid", "serial"))

    windows = report["windows"]
    assert {(w["precision"], w["window_batch"]) for w in windows} == {("fp32", 1), ("fp32", 2)}
    for w in windows:
        assert "error" not in w, w
        assert w["ms_per_window"] > 0 and w["ms_per_batch"] > 0
        assert w["ms_per_window"] == pytest.approx(w["ms_per_batch"] / w["window_batch"], rel=1e-3)


def test_smoke_agreement_and_volume(smoke):
    report, _, _ = smoke
    agree = report["agreement"]
    assert set(agree) >= {"fp16_vs_fp32", "trt_vs_fp32"}
    assert "skipped" in agree["fp16_vs_fp32"] and "skipped" in agree["trt_vs_fp32"]
    same = agree["fp32_vs_fp32"]  # fp32 twice: the run is deterministic, and labels are not all background
    assert same["equal_fraction"] == 1.0 and same["rel_l2"] == 0.0
    assert same["reference_distinct_labels"] > 1

    vol = report["volume"]
    assert vol["shape"] == [64, 64, 64]
    assert vol["seconds"] > 0 and vol["volumes_per_s"] > 0
    assert vol["n_classes"] == 117 and vol["label_dtype"] == "uint8" and vol["n_windows"] == 27
    assert "device_peak_allocated_mb" in vol and "device_peak_reserved_mb" in vol  # None on a CPU


def test_smoke_skips_fp16_compile_trt_with_reasons(smoke):
    report, proc, _ = smoke
    skipped = {s["part"]: s["reason"] for s in report["skipped"]}
    for part in ("fp16", "compile", "trt"):
        assert part in skipped, report["skipped"]
        assert skipped[part]
    assert "CUDA" in skipped["fp16"] and "CUDA" in skipped["trt"]
    assert "skipped trt" in proc.stdout and "wrote" in proc.stdout


def test_full_mode_without_cuda_exits_2(tmp_path):
    out = tmp_path / "full.json"
    proc = run_script(["--json", str(out)], timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device: run with --smoke on CPU, or on a GPU machine" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    proc = run_script(["--smoke", "--device", "cuda", "--json", str(out)], timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and "Traceback" not in proc.stderr


def test_script_imports_only_torch_monai_and_the_stdlib():
    tree = ast.parse(SCRIPT.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            imported.add(node.module.split(".")[0])
    assert not imported & {"ray", "nvseg_ray", "benchmarks", "pydantic", "fsspec", "scipy", "yaml"}, imported
    third_party = imported - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party <= {"torch", "monai", "tensorrt", "polygraphy"}, third_party
