"""The batch job under hostile inputs and settings (issue 11): it always ends, with a manifest, and leaks no secret.

* a folder with more bad volumes than the in-flight bound (all-zero, constant, truncated, garbage, complex, 4-D,
  NaN, qform/sform mismatch, absurd header, empty, a named pipe, a link to /dev/zero) -- used to hang at "5/14";
* untyped exceptions escaping each stage become failed rows and free their slot;
* manifest ``output_name`` values that could write outside ``--output`` are refused;
* resource requests no node can satisfy fail fast with exit 2;
* under ``ray job submit`` with S3 credentials in the workers' environment, the secret appears in no Ray log
  and no state/job API answer.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from nvseg_ray.batch import BatchConfig, run_batch
from nvseg_ray.batch.cli import main as batch_main
from nvseg_ray.batch.pipeline import FAULT_RAISE_ENV, check_resources
from nvseg_ray.errors import ConfigError

from .helpers import make_nifti, nifti_bytes, write_nifti_file
from .model_helpers import TEST_PATCH, body_phantom, save_volume

AFFINE = np.diag([1.4, 1.4, 2.5, 1.0])
SHAPE = (36, 34, 18)


def batch_cfg(input: str, output: str, checkpoint: str, **kw) -> BatchConfig:
    inference = {"checkpoint": checkpoint, "classes": ["liver", "spleen"], "patch_size": TEST_PATCH, "device": "cpu"}
    return BatchConfig(input=input, output=output, inference=inference, progress_interval_s=60,
                       progress_bars=False, max_failures=-1, **kw)


def good_volumes(root: Path, names: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        save_volume(root / f"{name}.nii.gz", body_phantom((36 + 2 * i, 34, 18), seed=i), AFFINE)


def bad_volumes(root: Path) -> list[str]:
    """The hostile mix of issue 11 (10 files) plus a named pipe and a symlink to /dev/zero; returns the names."""
    existing = {p.name for p in root.iterdir()}

    def write(name: str, img: nib.Nifti1Image) -> None:
        write_nifti_file(str(root / name), img)

    write("zero.nii.gz", make_nifti(SHAPE, AFFINE, np.int16, data=np.zeros(SHAPE)))
    write("constant.nii.gz", make_nifti(SHAPE, AFFINE, np.int16, data=np.full(SHAPE, 40.0)))
    full = nifti_bytes(make_nifti(SHAPE, AFFINE, np.int16), gz=True)
    (root / "truncated.nii.gz").write_bytes(full[: len(full) // 2])
    (root / "garbage.nii.gz").write_bytes(np.random.default_rng(0).bytes(5000))
    write("complex.nii.gz", make_nifti(SHAPE, AFFINE, np.complex64))
    write("four_d.nii.gz", make_nifti(SHAPE + (3,), AFFINE, np.int16))
    nan = body_phantom(SHAPE).astype(np.float32)
    nan[5:10] = np.nan
    write("nan.nii.gz", make_nifti(SHAPE, AFFINE, np.float32, data=nan))
    elsewhere = AFFINE.copy()
    elsewhere[:3, 3] = [50.0, -40.0, 90.0]
    write("qsform.nii.gz", make_nifti(SHAPE, AFFINE, np.int16, qform=AFFINE, sform=elsewhere))
    raw = bytearray(nifti_bytes(make_nifti(SHAPE, AFFINE, np.int16)))
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw)))
    header["dim"][1:4] = [30000, 30000, 30000]  # absurd: 54 TB of voxels declared
    raw[: len(header.binaryblock)] = header.binaryblock
    (root / "absurd.nii.gz").write_bytes(gzip.compress(bytes(raw)))
    (root / "empty.nii.gz").write_bytes(b"")
    os.mkfifo(root / "pipe.nii.gz")  # reading it would block forever
    (root / "devzero.nii.gz").symlink_to("/dev/zero")  # reading it would never end
    return sorted(p.name for p in root.iterdir() if p.name not in existing)


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.timeout(420)
def test_more_bad_volumes_than_the_in_flight_bound_still_ends_with_a_manifest(tiny_checkpoint, tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    good_volumes(inputs, ["good0", "good1", "good2", "good3"])
    bad = bad_volumes(inputs)
    assert len(bad) == 12
    result = run_batch(batch_cfg(str(inputs), str(out), tiny_checkpoint, max_in_flight=2), echo=lambda s: None)

    rows = {Path(r["uri"]).name: r for r in result.manifest.to_dict("records")}
    assert len(rows) == 16
    assert {rows[f"good{i}.nii.gz"]["status"] for i in range(4)} == {"ok"}
    for name in bad:  # typed or internal, each bad volume is one failed row with a code and a message
        if name in ("constant.nii.gz",):  # whether a constant volume is refused is the validator's call
            assert rows[name]["status"] in ("ok", "failed")
            continue
        assert rows[name]["status"] == "failed", name
        assert rows[name]["error_code"] and rows[name]["error_message"], name
    assert rows["pipe.nii.gz"]["error_code"] == rows["devzero.nii.gz"]["error_code"] == "not_a_regular_file"
    assert "named pipe" in rows["pipe.nii.gz"]["error_message"]
    assert "/dev/zero" in rows["devzero.nii.gz"]["error_message"]
    # the bound held and every slot was freed, the failed volumes' included
    assert result.summary["in_flight"] == {"limit": 2, "held": 0, "peak": 2}
    manifest = pd.read_parquet(result.summary["manifest"])
    assert len(manifest) == 16 and (manifest["status"] == "ok").sum() >= 4


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.timeout(300)
def test_internal_errors_escaping_each_stage_become_failed_rows(tiny_checkpoint, tmp_path, monkeypatch):
    inputs = tmp_path / "in"
    good_volumes(inputs, ["boom_pre", "boom_model", "boom_post", "fine"])
    # NVSEG_* settings reach the workers (forwarded: not secret)
    monkeypatch.setenv(FAULT_RAISE_ENV, "preprocess:boom_pre,model:boom_model,postprocess:boom_post")
    # one volume in flight: a slot not freed by any of the three failures would hang the job here
    result = run_batch(batch_cfg(str(inputs), str(tmp_path / "out"), tiny_checkpoint, max_in_flight=1),
                       echo=lambda s: None)
    rows = {Path(r["uri"]).name: r for r in result.manifest.to_dict("records")}
    assert rows["fine.nii.gz"]["status"] == "ok"
    for name, stage in (("boom_pre", "preprocess"), ("boom_model", "inference"), ("boom_post", "postprocess")):
        row = rows[f"{name}.nii.gz"]
        assert (row["status"], row["error_code"]) == ("failed", "internal_error"), row
        assert row["error_message"] == f"{stage} failed: RuntimeError: injected {stage.replace('inference', 'model')} fault"
    assert result.summary["in_flight"] == {"limit": 1, "held": 0, "peak": 1}
    assert result.exit_code == 0  # max_failures=-1


@pytest.mark.parametrize("name", ["../escaped", "/tmp/abs", "s3://other-bucket/x", "memory::x", "..", "sub/dir",
                                  "C:\\evil"])
def test_manifest_output_name_outside_the_output_is_refused(tiny_checkpoint, tmp_path, name):
    inputs = tmp_path / "data" / "in"
    good_volumes(inputs, ["a"])
    listing = tmp_path / "data" / "list.jsonl"
    listing.write_text(json.dumps({"uri": str(inputs / "a.nii.gz"), "output_name": name}))
    out = tmp_path / "data" / "out"
    before = {p for p in tmp_path.rglob("*")}
    # every row is refused while planning, so no Ray is needed
    result = run_batch(batch_cfg(str(listing), str(out), tiny_checkpoint), echo=lambda s: None)
    row = result.manifest.iloc[0]
    assert (row["status"], row["error_code"]) == ("failed", "invalid_output_name")
    assert repr(name) in row["error_message"] and row["output_uri"] == ""
    written = {p for p in tmp_path.rglob("*")} - before
    assert all(out in p.parents or p == out for p in written), written  # only the run's manifest, below --output
    assert not list(out.rglob("*.nii.gz"))


def test_resource_check_names_the_request_and_the_largest_node():
    nodes = [{"Alive": True, "Resources": {"CPU": 8.0, "memory": 16 * 2**30}},
             {"Alive": True, "Resources": {"CPU": 2.0, "memory": 64 * 2**30}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0, "memory": 512 * 2**30}}]
    cfg = BatchConfig(input="x", output="y", inference={"checkpoint": "m.pt"}, stage_memory_gb=32)
    check_resources(cfg, 0.0, nodes)  # 2 CPUs + 64 GiB on one node: fits
    with pytest.raises(ConfigError, match=r"a model actor: it asks for 1 CPU, 1 GPU, the largest node has 8 CPU, "
                                          r"0 GPU") as err:
        check_resources(cfg, 1.0, nodes)  # the dead GPU node does not count
    assert err.value.code == "unsatisfiable_resources" and err.value.exit_code == 2
    with pytest.raises(ConfigError, match=r"preprocess task: it asks for 4 CPU, 32.0 GiB memory"):
        check_resources(cfg.model_copy(update={"preprocess_cpus": 4.0}), 0.0, nodes)


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("flags", [["--model-gpus", "1"], ["--stage-memory-gb", "100"]])
def test_unsatisfiable_requests_fail_fast_with_exit_2(tiny_checkpoint, tmp_path, capsys, monkeypatch, flags):
    monkeypatch.delenv("KUBERAY_GEN_RAY_START_CMD", raising=False)
    inputs = tmp_path / "in"
    good_volumes(inputs, ["a"])
    argv = ["--input", str(inputs), "--output", str(tmp_path / "out"), "--checkpoint", tiny_checkpoint,
            "--classes", "liver", "--device", "cpu", "--patch-size", ",".join(map(str, TEST_PATCH)), "--no-progress-bars",
            *flags]
    assert batch_main(argv) == 2
    err = capsys.readouterr().err
    assert "unsatisfiable_resources" in err and "no node of the Ray cluster can run" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_no_secret_reaches_ray_logs_or_state_api(tiny_checkpoint, tmp_path, s3_server):
    """`ray job submit` on a `ray start` cluster whose processes hold the S3 credentials (as KubeRay pods get
    them from a Secret): the job runs over S3, and the secret is in no file under the session dir and in no
    answer of the job/task/actor APIs."""
    import boto3
    from ray.util import state

    from .test_batch_jobs import COMMON, _env, start_ray_head, submit_job

    secret = f"SeCrEt{uuid.uuid4().hex}"
    key_id = f"AKIA{uuid.uuid4().hex[:16].upper()}"
    env = _env(AWS_ENDPOINT_URL=s3_server.endpoint_url, AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret,
               AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    env.pop("AWS_SESSION_TOKEN", None)
    env.pop("AWS_PROFILE", None)
    bucket = f"nvseg-secret-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url, aws_access_key_id=key_id,
                      aws_secret_access_key=secret, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    good_volumes(tmp_path / "in", ["one", "two"])
    for name in ("one", "two"):
        s3.upload_file(str(tmp_path / "in" / f"{name}.nii.gz"), bucket, f"ct/{name}.nii.gz")
    s3.upload_file(tiny_checkpoint, bucket, "models/model.pt")

    with start_ray_head(env) as (address, temp_dir):
        done = submit_job(address, env, ["--input", f"s3://{bucket}/ct/", "--output", f"s3://{bucket}/masks/",
                                         "--checkpoint", f"s3://{bucket}/models/model.pt", *COMMON])
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        answers = [state.list_jobs(address=address, detail=True, limit=1000),
                   state.list_tasks(address=address, detail=True, limit=10000),
                   state.list_actors(address=address, detail=True, limit=10000)]
        leaked_api = [repr(a)[:200] for a in answers if secret in repr(a) or key_id in repr(a)]
        leaked_files = []
        for path in Path(temp_dir).rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                if secret.encode() in data or key_id.encode() in data:
                    leaked_files.append(str(path.relative_to(temp_dir)))
    assert not leaked_api, leaked_api
    assert not leaked_files, leaked_files
    assert secret not in done.stdout + done.stderr
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="masks/")["Contents"]]
    assert sum(k.endswith("_trans.nii.gz") for k in keys) == 2
    manifest = next(k for k in keys if k.endswith("manifest.parquet"))
    assert secret.encode() not in s3.get_object(Bucket=bucket, Key=manifest)["Body"].read()
