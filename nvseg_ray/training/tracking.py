"""MLflow tracking of a finetuning run: one MLflow run per Ray run name (a resume, or a restart after a
worker failure, continues the same MLflow run), written by rank 0 only."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .config import TrainConfig

#: tag holding the Ray run name; a resume finds its MLflow run by it.
MLFLOW_RUN_TAG = "nvseg.ray_run_name"


def resolve_tracking_uri(uri: str | None) -> tuple[str | None, str | None]:
    """Resolve ``mlflow_tracking_uri`` to ``(tracking_uri, artifact_location)``.

    A scheme-less value is a local folder (upstream's ``mlruns/``). MLflow 3 refuses its file store, so
    the folder holds an SQLite store ``mlflow.db`` and the artifacts under ``artifacts/`` (absolute, so
    Ray workers whose working directory differs write to the same place). URIs pass through unchanged
    (artifact location: the server's default). ``None``/empty disables tracking.
    """
    if not uri:
        return None, None
    if "://" in uri or uri.startswith(("sqlite:", "databricks")):
        return uri, None
    folder = Path(uri).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()


def ensure_experiment(tracking_uri: str, name: str, artifact_location: str | None) -> str:
    """Create the MLflow experiment once, in the driver (workers then only look it up)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


class Tracker:
    """Thin MLflow wrapper: a no-op when disabled or on ranks > 0.

    A new MLflow run gets the run-name tag, every option as a parameter (lists/dicts as JSON; never the
    storage options, which may hold credentials) and ``train_config.json``; a found one is continued."""

    def __init__(self, cfg: TrainConfig, tracking_uri: str | None, run_name: str, enabled: bool) -> None:
        self.mlflow = None
        if not (enabled and tracking_uri):
            return
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(cfg.experiment_name)
        found = mlflow.search_runs(filter_string=f"tags.`{MLFLOW_RUN_TAG}` = '{run_name}'", output_format="list",
                                   max_results=1)
        if found:
            mlflow.start_run(run_id=found[0].info.run_id)
        else:
            mlflow.start_run(run_name=run_name, tags={MLFLOW_RUN_TAG: run_name})
            params = {k: json.dumps(v) if isinstance(v, (list, tuple, dict)) else v
                      for k, v in cfg.model_dump(mode="json").items() if k != "storage_options"}
            mlflow.log_params(params)
            mlflow.log_dict(cfg.model_dump(mode="json", exclude={"storage_options"}), "train_config.json")
        self.mlflow = mlflow

    @property
    def active(self) -> bool:
        return self.mlflow is not None

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.mlflow is not None:
            self.mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=step)

    def artifacts(self, folder: str, subdir: str) -> None:
        if self.mlflow is not None:
            self.mlflow.log_artifacts(folder, subdir)

    def end(self, status: str = "FINISHED") -> None:
        if self.mlflow is not None:
            self.mlflow.end_run(status=status)
            self.mlflow = None
