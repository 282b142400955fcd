"""The TensorRT plan cache: stable keys, safe names, builds serialised across real processes by the lock, the
lock timeout, atomic plans, failure markers."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nvseg_ray.backends.engine_cache import (DEFAULT_BUILD_TIMEOUT_S, DEFAULT_ENGINE_CACHE_DIR, PLAN_SUFFIX,
                                             BuildTimeout, EngineCache, EngineKey, default_cache_dir,
                                             monai_base_path)

REPO = Path(__file__).resolve().parents[1]

KEY = EngineKey(checkpoint_sha256="ab" * 32, gpu_name="NVIDIA H200", compute_capability="9.0",
                tensorrt_version="10.3.0", monai_version="1.6.1", precision="fp16", patch_size=(192, 192, 128),
                window_batch=1, in_channels=1)
#: sha256 of the sorted compact JSON of KEY's fields, first 24 hex: pinned so that a change of the digest (which
#: orphans every cached engine) is a deliberate one
KEY_DIGEST = "9ba0f64ac6ec1bc2c0b6417a"

CHANGED = {"checkpoint_sha256": "cd" * 32, "gpu_name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0",
           "tensorrt_version": "10.3.1", "monai_version": "1.6.2", "precision": "fp32",
           "patch_size": (192, 192, 96), "window_batch": 2, "in_channels": 2}


def test_digest_is_pinned_and_stable_across_processes():
    assert KEY.digest() == KEY_DIGEST
    code = ("from nvseg_ray.backends.engine_cache import EngineKey; "
            "print(EngineKey('ab'*32, 'NVIDIA H200', '9.0', '10.3.0', '1.6.1', 'fp16', (192, 192, 128), 1, 1)"
            ".digest())")
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == KEY_DIGEST
    # a list where a tuple was given: the same key (JSON does not tell them apart)
    assert dataclasses.replace(KEY, patch_size=[192, 192, 128]).digest() == KEY_DIGEST


def test_every_field_is_covered_by_the_test():
    assert set(CHANGED) == {f.name for f in dataclasses.fields(EngineKey)}


@pytest.mark.parametrize("field", sorted(CHANGED))
def test_digest_changes_with_any_single_field(field):
    other = dataclasses.replace(KEY, **{field: CHANGED[field]})
    assert other.digest() != KEY.digest()
    assert other.file_stem() != KEY.file_stem()
    assert len(other.digest()) == 24 and int(other.digest(), 16) >= 0


def test_file_stem_is_readable_and_safe():
    assert KEY.file_stem() == f"vista3d-encoder-trt10.3-fp16-w1-{KEY_DIGEST}"
    odd = dataclasses.replace(KEY, tensorrt_version="10.3.0/../../etc", precision="fp16 mixed;rm -rf",
                              gpu_name="NVIDIA GeForce RTX 4090 (Laptop)/x")
    stem = odd.file_stem()
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in stem), stem
    assert "/" not in stem and " " not in stem and stem.endswith(odd.digest())


def test_defaults_and_env(monkeypatch, tmp_path):
    assert DEFAULT_ENGINE_CACHE_DIR == "~/.cache/nvseg-ray/engines"
    assert DEFAULT_BUILD_TIMEOUT_S == 1800.0
    monkeypatch.delenv("NVSEG_ENGINE_CACHE", raising=False)
    assert default_cache_dir() == Path(DEFAULT_ENGINE_CACHE_DIR).expanduser()
    monkeypatch.setenv("NVSEG_ENGINE_CACHE", str(tmp_path / "e"))
    assert default_cache_dir() == tmp_path / "e"


def test_plan_name_lines_up_with_monai(tmp_path):
    """trt_compile(model, base_path, submodule=["image_encoder.encoder"]) saves
    f"{base_path}.image_encoder.encoder.plan"."""
    cache = EngineCache(tmp_path)
    plan = cache.plan_path(KEY)
    assert plan == tmp_path / f"{KEY.file_stem()}.image_encoder.encoder.plan"
    assert PLAN_SUFFIX == ".image_encoder.encoder.plan"
    base = monai_base_path(plan)
    assert base + "." + "image_encoder.encoder" + ".plan" == str(plan)
    with pytest.raises(ValueError):
        monai_base_path(tmp_path / "x.plan")


# ------------------------------------------------------------------------------------------------------------
# building
# ------------------------------------------------------------------------------------------------------------


def test_build_once_then_reuse(tmp_path):
    root = tmp_path / "a" / "b"  # parents created
    cache = EngineCache(root)
    calls = []

    def build_fn(tmp: Path) -> None:
        calls.append(tmp)
        assert tmp.parent == root and tmp.name.endswith(PLAN_SUFFIX) and tmp != cache.plan_path(KEY)
        tmp.write_bytes(b"PLAN")

    assert cache.build(KEY, build_fn) == cache.plan_path(KEY)
    assert cache.build(KEY, build_fn) == cache.plan_path(KEY)
    assert len(calls) == 1 and not calls[0].exists()
    assert cache.plan_path(KEY).read_bytes() == b"PLAN"
    assert sorted(p.name for p in root.iterdir()) == sorted([cache.plan_path(KEY).name, cache.lock_path(KEY).name])


def test_failing_build_leaves_no_plan_and_propagates(tmp_path):
    cache = EngineCache(tmp_path)
    seen = []

    def build_fn(tmp: Path) -> None:
        tmp.write_bytes(b"half a pl")
        seen.append(tmp)
        raise RuntimeError("polygraphy: fp16 in CreateConfig is not available")

    with pytest.raises(RuntimeError, match="fp16 in CreateConfig"):
        cache.build(KEY, build_fn)
    assert not cache.plan_path(KEY).exists()
    assert not seen[0].exists()
    assert not list(tmp_path.glob("*.plan"))


def test_build_that_writes_nothing_is_an_error(tmp_path):
    cache = EngineCache(tmp_path)
    with pytest.raises(RuntimeError, match="wrote no plan"):
        cache.build(KEY, lambda tmp: None)
    with pytest.raises(RuntimeError, match="wrote no plan"):
        cache.build(KEY, lambda tmp: tmp.write_bytes(b""))
    assert not cache.plan_path(KEY).exists()


def test_partial_plan_never_visible_under_the_final_name(tmp_path):
    cache = EngineCache(tmp_path)
    final = cache.plan_path(KEY)
    chunk = b"x" * 65536

    def build_fn(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            for _ in range(8):
                fh.write(chunk)
                fh.flush()
                assert not final.exists()  # a reader would see nothing, not a prefix
    assert cache.build(KEY, build_fn) == final
    assert final.stat().st_size == 8 * len(chunk)


def test_stale_temp_of_a_dead_builder_is_removed(tmp_path):
    cache = EngineCache(tmp_path)
    stale = tmp_path / f".tmp-99999-deadbeef-{KEY.file_stem()}{PLAN_SUFFIX}"
    stale.write_bytes(b"truncated")
    cache.build(KEY, lambda tmp: tmp.write_bytes(b"PLAN"))
    assert not stale.exists() and cache.plan_path(KEY).read_bytes() == b"PLAN"


# ------------------------------------------------------------------------------------------------------------
# real processes
# ------------------------------------------------------------------------------------------------------------

_BUILDER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from nvseg_ray.backends.engine_cache import EngineCache, EngineKey
    root, log, start_at = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
    key = EngineKey("ab" * 32, "NVIDIA H200", "9.0", "10.3.0", "1.6.1", "fp16", (192, 192, 128), 1, 1)
    built = []
    def build_fn(tmp):
        with open(log, "a") as fh:
            fh.write(f"start {time.time()!r}\\n")
        time.sleep(1.0)
        tmp.write_bytes(b"PLAN")
        built.append(True)
        with open(log, "a") as fh:
            fh.write(f"end {time.time()!r}\\n")
    while time.time() < start_at:
        time.sleep(0.005)
    path = EngineCache(root, build_timeout_s=60).build(key, build_fn)
    print(json.dumps({"path": str(path), "built": bool(built), "returned": time.time()}))
""")


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_two_processes_share_one_build(tmp_path):
    log = tmp_path / "builds.log"
    start_at = time.time() + 2.0  # both start their build() at the same moment
    procs = [subprocess.Popen([sys.executable, "-c", _BUILDER, str(tmp_path / "cache"), str(log), repr(start_at)],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    lines = log.read_text().split()
    assert lines[0::2] == ["start", "end"], lines  # exactly one build
    start, end = float(lines[1]), float(lines[3])
    assert end - start >= 0.9
    assert sorted(r["built"] for r in results) == [False, True]
    waiter = next(r for r in results if not r["built"])
    assert waiter["returned"] >= end  # it waited for the build, not beside it
    assert {r["path"] for r in results} == {str(EngineCache(tmp_path / "cache").plan_path(KEY))}
    assert Path(results[0]["path"]).read_bytes() == b"PLAN"


_HOLDER = textwrap.dedent("""
    import sys, time
    from nvseg_ray.backends.engine_cache import EngineCache, EngineKey
    key = EngineKey("ab" * 32, "NVIDIA H200", "9.0", "10.3.0", "1.6.1", "fp16", (192, 192, 128), 1, 1)
    with EngineCache(sys.argv[1]).locked(key):
        print("locked", flush=True)
        time.sleep(30)
""")


def test_lock_wait_times_out(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cache = EngineCache(tmp_path, build_timeout_s=0.5)
        calls = []
        t0 = time.monotonic()
        with pytest.raises(BuildTimeout, match="0.5 s"):
            cache.build(KEY, calls.append)
        waited = time.monotonic() - t0
        assert 0.45 <= waited < 5.0
        assert not calls and not cache.plan_path(KEY).exists()
        assert issubclass(BuildTimeout, TimeoutError)
    finally:
        holder.kill()
        holder.communicate(timeout=30)
    # the holder died: its lock went with it
    assert EngineCache(tmp_path, build_timeout_s=0.5).build(KEY, lambda t: t.write_bytes(b"P")).read_bytes() == b"P"


_POLLER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    final, until = Path(sys.argv[1]), float(sys.argv[2])
    sizes = set()
    print("polling", flush=True)
    while time.time() < until:
        try:
            sizes.add(len(final.read_bytes()))
        except FileNotFoundError:
            sizes.add(-1)
    print(json.dumps(sorted(sizes)))
""")


def test_a_concurrent_reader_sees_no_plan_or_the_whole_plan(tmp_path):
    cache = EngineCache(tmp_path)
    final = cache.plan_path(KEY)
    total = 32 * 65536
    poller = subprocess.Popen([sys.executable, "-c", _POLLER, str(final), repr(time.time() + 4.0)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert poller.stdout.readline().strip() == "polling"

    def build_fn(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            for _ in range(32):
                fh.write(b"y" * 65536)
                fh.flush()
                time.sleep(0.02)

    cache.build(KEY, build_fn)
    out, err = poller.communicate(timeout=60)
    sizes = json.loads(out.strip().splitlines()[-1])
    assert set(sizes) <= {-1, total} and total in sizes, sizes


# ------------------------------------------------------------------------------------------------------------
# failure markers
# ------------------------------------------------------------------------------------------------------------


def test_failure_marker_roundtrip(tmp_path):
    cache = EngineCache(tmp_path / "new")
    assert cache.failed_before(KEY) is None
    cache.mark_failed(KEY, "build_failed", "RuntimeError: out of memory")
    marker = cache.failed_before(KEY)
    assert marker["code"] == "build_failed" and marker["reason"] == "RuntimeError: out of memory"
    assert marker["marker"] == str(cache.marker_path(KEY)) and marker["key"]["gpu_name"] == "NVIDIA H200"
    assert cache.failed_before(dataclasses.replace(KEY, window_batch=4)) is None  # keyed
    assert not [p for p in (tmp_path / "new").iterdir() if p.name.startswith(".tmp-")]
    cache.clear_failure(KEY)
    cache.clear_failure(KEY)  # idempotent
    assert cache.failed_before(KEY) is None


def test_unreadable_marker_still_counts_as_a_failure(tmp_path):
    cache = EngineCache(tmp_path)
    cache.marker_path(KEY).write_text("{not json")
    marker = cache.failed_before(KEY)
    assert marker is not None and marker["code"] == "build_failed"
