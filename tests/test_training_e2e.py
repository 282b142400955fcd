"""Finetuning end to end: a worker killed mid-run (Ray Train restarts from the last checkpoint) tracked by a
real MLflow tracking server, checkpoints on the loopback S3 server (and a resume from there), and the
README's finetuning walkthrough (the same commands as docs/finetune.md) run command by command in a sandbox.

Kept small for 2 CPU cores: 32³ volumes at 1.5 mm, patch 32³, 1-2 epochs per run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from nvseg_ray.training.worker import FAULT_INJECTION_ENV

from .helpers import FINETUNE_SECTION, readme_section, runnable_commands
from .test_training import make_dataset, tiny_cfg

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "finetune.md"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on a free loopback port (SQLite backend, local artifact root); yields its URL."""
    pytest.importorskip("mlflow")
    port = _free_port()
    exe = Path(sys.executable).with_name("mlflow")
    cmd = [str(exe) if exe.exists() else "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
           "--default-artifact-root", str(tmp_path / "artifacts"), "--workers", "1"]
    log = open(tmp_path / "mlflow-server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("mlflow server did not start:\n" + (tmp_path / "mlflow-server.log").read_text())
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# ------------------------------------------------------------------------------------------------------
# 1 + 2. A worker dies mid-run; MLflow through a real tracking server
# ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_worker_killed_mid_run_resumes_and_mlflow_server_tracks(tmp_path, tiny_checkpoint, ray_cluster,
                                                               mlflow_server, monkeypatch):
    """Rank 1 exits abruptly (``os._exit``) at the start of epoch 1 of its first attempt. With
    ``max_failures=1`` Ray Train restarts the worker group from the epoch-0 checkpoint: the run finishes,
    the history is epochs 0, 1 (no repeated epoch 0) and the one MLflow run holds one point per epoch."""
    from mlflow.tracking import MlflowClient

    from nvseg_ray.training.run import run_training
    from nvseg_ray.training.tracking import MLFLOW_RUN_TAG

    datalist = make_dataset(tmp_path / "data")
    cfg = tiny_cfg(tmp_path, datalist, tiny_checkpoint, epochs=2, max_failures=1, run_name="killed",
                   mlflow_tracking_uri=mlflow_server, experiment_name="e2e")
    monkeypatch.setenv(FAULT_INJECTION_ENV, "1:1")
    result = run_training(cfg)

    marker = Path(cfg.storage_path) / "killed" / ".nvseg_fault_injected"
    assert marker.is_file(), "the injected worker exit did not happen"
    assert [h["epoch"] for h in result.history] == [0, 1]
    assert result.metrics["epoch"] == 1
    assert all(0.0 <= h["val_dice_3"] <= 1.0 for h in result.history)
    assert Path(cfg.output).is_file() and json.loads(Path(cfg.output + ".labels.json").read_text())["epoch"] == 1

    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "the restart must continue the same MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags[MLFLOW_RUN_TAG] == "killed"
    params = run.data.params
    assert float(params["learning_rate"]) == pytest.approx(1e-3)
    assert params["epochs"] == "2" and json.loads(params["patch_size"]) == [32, 32, 32]
    for key in ("train_loss", "val_dice_3", "val_mean_dice"):
        hist = client.get_metric_history(run.info.run_id, key)
        # the restart resumed from epoch 0's checkpoint: epoch 0 is logged once, epoch 1 once
        assert sorted(m.step for m in hist) == [0, 1], (key, [(m.step, m.value) for m in hist])
    losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_loss")}
    assert losses == {int(h["epoch"]): pytest.approx(h["train_loss"]) for h in result.history}

    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "train_config.json" in top and "model" in top
    logged_cfg = json.loads(Path(client.download_artifacts(run.info.run_id, "train_config.json",
                                                           str(tmp_path / "dl"))).read_text())
    assert logged_cfg["epochs"] == 2 and logged_cfg["patch_size"] == [32, 32, 32]
    model_files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "model")}
    assert model_files == {"model.pt", "model.pt.labels.json"}


# ------------------------------------------------------------------------------------------------------
# 3. Checkpoints on the loopback S3 server, resume from S3
# ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_checkpoints_on_s3_and_resume(tmp_path, tiny_checkpoint, ray_cluster, s3_env, s3_bucket):
    import s3fs

    from nvseg_ray.training.run import run_training

    datalist = make_dataset(tmp_path / "data")
    storage = f"s3://{s3_bucket}/train"
    cfg = tiny_cfg(tmp_path, datalist, tiny_checkpoint, epochs=1, num_workers=1, run_name="on-s3",
                   storage_path=storage, output=f"s3://{s3_bucket}/models/finetuned.pt")
    first = run_training(cfg)
    assert [h["epoch"] for h in first.history] == [0]

    fs = s3fs.S3FileSystem(**s3_env)
    run_dir = f"{s3_bucket}/train/on-s3"

    def checkpoints() -> list[str]:
        fs.invalidate_cache()
        return sorted(p for p in fs.ls(run_dir) if re.fullmatch(r"checkpoint_\d{4}-.*", Path(p).name))

    ckpts = checkpoints()
    assert len(ckpts) == 1, fs.ls(run_dir)
    assert {Path(p).name for p in fs.ls(ckpts[0])} >= {"model.pt", "model.pt.labels.json", "train_state.pt"}
    assert first.checkpoint_path and s3_bucket in first.checkpoint_path
    assert fs.exists(f"{s3_bucket}/models/finetuned.pt") and fs.exists(f"{s3_bucket}/models/finetuned.pt.labels.json")

    # same run name and storage, one more epoch: resumes from the S3 checkpoint
    second = run_training(cfg.model_copy(update={"epochs": 2}))
    assert [h["epoch"] for h in second.history] == [0, 1]
    assert second.history[0] == first.history[0]
    assert len(checkpoints()) == 2  # num_to_keep=2
    assert fs.exists(f"{run_dir}/checkpoint_manager_snapshot.json")
    sidecar = json.loads(fs.cat_file(f"{s3_bucket}/models/finetuned.pt.labels.json"))
    assert sidecar["epoch"] == 1


# ------------------------------------------------------------------------------------------------------
# 4. the README's finetuning walkthrough (docs/finetune.md explains the same commands step by step)
# ------------------------------------------------------------------------------------------------------


def doc_commands() -> list[str]:
    """The runnable lines of the README's finetuning section, in order."""
    return runnable_commands(readme_section((REPO / "README.md").read_text(), FINETUNE_SECTION))


#: what the test appends to keep each command tiny (nothing else is changed).
TINY = {"train": ["--patch-size", "32,32,32", "--loader-workers", "0"], "evaluate": ["--patch-size", "32,32,32"],
        "segment": ["--patch-size", "32,32,32"]}


def _sandbox(work: Path, checkpoint: str) -> None:
    """What the doc assumes the user has in the checkout: configs/, models/model.pt and data/spleen/."""
    (work / "configs").mkdir(parents=True)
    (work / "configs" / "train_finetune.yaml").write_bytes((REPO / "configs" / "train_finetune.yaml").read_bytes())
    (work / "models").mkdir()
    (work / "models" / "model.pt").write_bytes(Path(checkpoint).read_bytes())
    data = work / "data" / "spleen"
    tmp = make_dataset(work / "gen")
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    items = []
    for item in json.loads(tmp.read_text())["training"]:
        i = item["image"][3:-7]
        (work / "gen" / item["image"]).rename(data / "imagesTr" / f"spleen_{i}.nii.gz")
        (work / "gen" / item["label"]).rename(data / "labelsTr" / f"spleen_{i}.nii.gz")
        items.append({"image": f"imagesTr/spleen_{i}.nii.gz", "label": f"labelsTr/spleen_{i}.nii.gz",
                      "fold": item["fold"]})
    (data / "datalist.json").write_text(json.dumps({"training": items,
                                                    "testing": [{"image": "imagesTr/spleen_0.nii.gz"}]}))


def test_doc_lists_the_walkthrough():
    commands = doc_commands()
    assert runnable_commands(DOC.read_text()) == commands  # the long-form guide shows exactly these commands
    kinds = [c.split()[1] for c in commands]
    assert kinds == ["jobs/train.py", "jobs/train.py", "jobs/evaluate.py", "segment"], commands
    assert "--run-name" in commands[0] and "--run-name" in commands[1]


@pytest.mark.slow
def test_doc_commands_run(tmp_path, tiny_checkpoint):
    work = tmp_path / "work"
    _sandbox(work, tiny_checkpoint)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "NVSEG_FAULT", "MLFLOW_"))}
    env.update({"RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"})
    outputs = []
    train_runs = 0
    for command in doc_commands():
        argv = shlex.split(command)
        if argv[0] == "scripts/nvseg":
            argv = [str(REPO / "scripts" / "nvseg"), *argv[1:], *TINY["segment"]]
        elif argv[1] == "jobs/train.py":
            train_runs += 1
            argv = [sys.executable, str(REPO / argv[1]), *argv[2:], *TINY["train"], "--epochs", str(train_runs)]
        else:
            argv = [sys.executable, str(REPO / argv[1]), *argv[2:], *TINY["evaluate"]]
        done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, f"doc command failed: {command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout)

    # train: the finetuned model + sidecar, MLflow store, Ray checkpoints; the resume continued at epoch 1
    first, second = (json.loads(out[out.index("{"):]) for out in outputs[:2])
    assert first["metrics"]["epoch"] == 0 and second["metrics"]["epoch"] == 1
    assert first["run_name"] == second["run_name"] == "spleen-ft"
    assert (work / "models" / "finetuned.pt").is_file()
    sidecar = json.loads((work / "models" / "finetuned.pt.labels.json").read_text())
    assert sidecar["epoch"] == 1 and sidecar["label_mapping"] == [[1, 3]]
    assert list((work / "runs" / "train" / "spleen-ft").glob("checkpoint_*/model.pt"))
    assert (work / "mlruns" / "mlflow.db").is_file()
    # evaluate: the tables the doc promises
    for name in ("per_case.parquet", "per_case.csv", "per_class.csv", "summary.json"):
        assert (work / "eval" / "finetuned" / name).is_file(), name
    assert json.loads((work / "eval" / "finetuned" / "summary.json").read_text())["n_cases"] == 1
    # segment with the finetuned checkpoint
    assert (work / "seg" / "spleen_3" / "spleen_3_trans.nii.gz").is_file()
