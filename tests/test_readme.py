"""The README's example commands are real: run every `scripts/nvseg ...` / `python jobs/...` line in a sandbox.

The sandbox holds what a user would have: scans, a manifest, a Hugging Face hub (the local stand-in,
reached through HF_ENDPOINT, serving a tiny generated checkpoint as model.pt) and an S3 bucket called
`bucket` (moto over HTTP, reached through AWS_ENDPOINT_URL). `scripts/test.sh` (this suite) and
`ray job submit` (tests/test_batch_jobs.py) are not re-run here.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pytest

from nvseg_ray.brain.phantom import rigid_scale_matrix, synthetic_head
from nvseg_ray.brain.template import load_template

from .brain_helpers import save_head
from .helpers import FINETUNE_SECTION, markdown_sections, python_blocks, readme_section, runnable_commands
from .hub_standin import hub_env
from .model_helpers import body_phantom, save_volume

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The README's runnable lines outside the finetuning walkthrough (tests/test_training_e2e.py runs that)."""
    sections = markdown_sections((REPO / "README.md").read_text())
    runnable = [c for head, body in sections.items() if not head.startswith(FINETUNE_SECTION)
                for c in runnable_commands(body)]
    # weights downloads first: every other example reads the checkpoints they create
    return sorted(runnable, key=lambda ln: not ln.startswith("scripts/nvseg weights download"))


def readme_chain(command: str) -> str:
    """Which independent chain of the README test runs ``command``: the weights downloads first ("setup"), then
    the S3 examples, the DICOM and brain examples and the rest in parallel (they write disjoint outputs)."""
    if command.startswith("scripts/nvseg weights download"):
        return "setup"
    if "s3://bucket/ct" in command or "cases.csv" in command:
        return "s3"
    if "dicom" in command or "head" in command:
        return "dicom-brain"
    return "local"


@pytest.fixture(scope="module")
def hf_hub_model_bytes(tiny_checkpoint):  # serve the tiny checkpoint as the "pretrained" weights
    return Path(tiny_checkpoint).read_bytes()


def test_readme_lists_the_commands():
    commands = readme_commands()
    assert any(c.startswith("scripts/nvseg batch --input scans/") for c in commands)  # the main command
    assert any(c.startswith("scripts/nvseg segment") for c in commands)
    assert (REPO / ".ci/run").read_text().count("scripts/test.sh") == 1  # CI runs the README's test command


def test_readme_commands_run(hf_hub, s3_env, tmp_path):
    work = tmp_path / "work"
    (work / "scans" / "site-a").mkdir(parents=True)
    save_volume(work / "scans" / "a.nii.gz", body_phantom((56, 50, 24), seed=1), np.diag([1.5, 1.5, 3.0, 1.0]))
    save_volume(work / "scans" / "site-a" / "b.nii", body_phantom((48, 52, 20), seed=2), np.diag([-1.6, -1.6, 3.2, 1.0]))
    save_volume(work / "scan.nii.gz", body_phantom((128, 112, 48), seed=3), np.diag([1.0, 1.0, 3.0, 1.0]))
    save_volume(work / "brain_in_template_space.nii.gz", body_phantom((60, 64, 56), seed=4) + 1000.0,
                np.diag([1.1, 1.1, 1.1, 1.0]))
    # raw T1 heads for the brain workflow: the default (nilearn) template with a skull, moved, on coarse grids
    template = load_template()
    save_head(work / "head.nii.gz", synthetic_head(template, rigid_scale_matrix((8, 0, -6), (4, -3, 2)),
                                                   spacing=(1.5, 1.5, 2.0), seed=1))
    (work / "heads").mkdir()
    save_head(work / "heads" / "sub-01.nii.gz", synthetic_head(template, rigid_scale_matrix((0, 10, 0), (0, 5, -5)),
                                                               spacing=(1.6, 1.6, 1.6), as_uint8=True, seed=2))
    (work / "cases.csv").write_text('uri,classes,output_name\nscans/a.nii.gz,"liver,3",case-a\n')
    # DICOM: a study folder (3 series + an SR + a localizer), a zip of one series, the same study in S3
    from nvseg_ray.dicom import synthetic as dsyn

    study = dsyn.write_folder_with_extras(work / "dicom" / "study", shape=(28, 24, 10))
    single = dsyn.write_series(tmp_path / "single", shape=(28, 24, 10), seed=9)
    dsyn.zip_series(work / "dicom" / "series.zip", [single])

    s3 = boto3.client("s3", endpoint_url=s3_env["endpoint_url"])
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if "bucket" not in existing:
        s3.create_bucket(Bucket="bucket")
    for name in ("a.nii.gz", "site-a/b.nii"):
        s3.upload_file(str(work / "scans" / name), "bucket", f"ct/{name}")
    for path in sorted((work / "dicom" / "study").rglob("*.dcm")):
        s3.upload_file(str(path), "bucket", f"dicom/{path.relative_to(work / 'dicom' / 'study')}")

    env = hub_env(hf_hub, tmp_path / "hf-home")
    env.update({"AWS_ENDPOINT_URL": s3_env["endpoint_url"], "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "RAY_ADDRESS": "local",
                "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    env.pop("NVSEG_FAULT_INJECT_ACTOR_EXIT", None)

    def run(command: str) -> None:
        argv = shlex.split(command)
        is_batch = argv[1:2] == ["batch"] or argv[1:2] == ["jobs/batch_segment.py"]  # not "--sw-batch-size"
        if argv[0] == "scripts/nvseg":
            argv[0] = str(REPO / "scripts" / "nvseg")
        else:  # python jobs/...
            argv = [sys.executable, str(REPO / argv[1]), *argv[2:]]
        argv += ["--no-progress-bars"] if is_batch else []
        done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"README command failed: {command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    def run_all(commands: list[str]) -> None:
        for command in commands:
            run(command)

    # The downloads first (every other example reads their checkpoints), then independent chains side by side:
    # each command keeps its README order within its chain, and no two chains touch the same outputs. A batch
    # command spends much of its time starting its own local Ray cluster, so this halves the test's wall time.
    chains: dict[str, list[str]] = {}
    for command in readme_commands():
        chains.setdefault(readme_chain(command), []).append(command)
    run_all(chains.pop("setup"))
    with ThreadPoolExecutor(len(chains)) as pool:
        for future in [pool.submit(run_all, commands) for commands in chains.values()]:
            future.result()

    # what the README promises landed where it says
    assert (work / "models" / "model.pt").read_bytes() == hf_hub.files["vista3d_pretrained_model/model.pt"].content
    assert json.loads((work / "models" / "model.pt.json").read_text())["revision"]
    for rel in ("masks/a/a_trans.nii.gz", "masks/a/a_trans.json", "masks/site-a/b/b_trans.nii.gz",
                "out/scan/scan_trans.nii.gz", "out/head/head_trans.nii.gz", "out/scan/scan_points.nii.gz",
                "masks-by-list/case-a/case-a_trans.nii.gz"):
        assert (work / rel).exists(), rel
    for fx in study.series:  # DICOM: NIfTI + SEG + report per series, named by UID
        stem = work / "dicom-out" / fx.study_uid / fx.series_uid / f"{fx.series_uid}_trans"
        assert all(Path(f"{stem}{ext}").exists() for ext in (".nii.gz", ".seg.dcm", ".json")), stem
    seg_only = work / "dicom-out" / single.study_uid / single.series_uid
    assert [p.name for p in sorted(seg_only.iterdir())] == [f"{single.series_uid}_trans.json",
                                                             f"{single.series_uid}_trans.seg.dcm"]
    runs = list((work / "masks" / "_nvseg_runs").glob("*/manifest.parquet"))
    assert runs and set(pd.read_parquet(runs[0])["status"]) == {"ok"}
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="bucket")["Contents"]}
    assert {"masks/a/a_trans.nii.gz", "masks/site-a/b/b_trans.nii.gz", "one-by-one/a/a_trans.nii.gz",
            "models/model.pt", "models/model.pt.json"} <= keys
    assert sum(k.startswith("dicom-masks/") and k.endswith(".seg.dcm") for k in keys) == len(study.series)


def test_readme_python_api_runs(tiny_checkpoint, tmp_path):
    """The README's "Python API" example runs as written, in a fresh interpreter, where a user has
    models/model.pt and scan.nii.gz; it writes what it says."""
    import shutil

    blocks = python_blocks(readme_section((REPO / "README.md").read_text(), "## Python API"))
    assert blocks, "the README's Python API section has no python block"
    (tmp_path / "models").mkdir()
    shutil.copy(tiny_checkpoint, tmp_path / "models" / "model.pt")
    save_volume(tmp_path / "scan.nii.gz", body_phantom((48, 44, 22), seed=5), np.diag([1.5, 1.5, 3.0, 1.0]))
    for block in blocks:
        done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, \
            f"README python block failed:\n{block}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert "uint16" in done.stdout and "kidney" in done.stdout
    assert (tmp_path / "out" / "scan" / "scan_api.nii.gz").is_file()
    report = json.loads((tmp_path / "out" / "scan" / "scan_api.json").read_text())
    assert {row["name"] for row in report["labels"]} <= {"background", "liver", "spleen"}


#: "docs/upstream.md, <Section>" / "..., Upstream bugs, item N": how code and docs cite the upstream facts
CITATION = re.compile(r"docs/upstream\.md\)?,\s+(Preprocessing|Inference|Outputs|Training and evaluation|"
                      r"Brain T1 workflow|Upstream bugs)(?:,\s+item\s+(\d+))?")


def test_upstream_citations_resolve():
    """Every citation of the upstream facts points into docs/upstream.md (the file users have), at a section
    and a bug item that exist; nothing cites the maintainers' own notes file (a file users do not have) or its
    numbered paragraphs any more."""
    stale = ("UPSTREAM" + ".md", "\u00a7")  # the old file name and its section sign
    doc = (REPO / "docs" / "upstream.md").read_text()
    sections = {head.lstrip("# ").strip() for head in markdown_sections(doc) if head.startswith("## ")}
    bugs = set(re.findall(r"^(\d+)\. ", markdown_sections(doc)["## Upstream bugs and how nvseg-ray handles them"],
                          re.M))
    files = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    files += [p for folder in ("nvseg_ray", "tests", "jobs", "serve_apps", "benchmarks", "scripts")
              for p in sorted((REPO / folder).rglob("*.py"))]
    cited = 0
    for path in files:
        text = " ".join(path.read_text().split())
        assert not any(word in text for word in stale), f"{path}: cite docs/upstream.md by section name"
        for section, item in CITATION.findall(text):
            cited += 1
            heading = "Upstream bugs and how nvseg-ray handles them" if section == "Upstream bugs" else section
            assert heading in sections, f"{path}: no section {section!r} in docs/upstream.md"
            assert not item or item in bugs, f"{path}: docs/upstream.md has no upstream bug item {item}"
    assert cited >= 15
