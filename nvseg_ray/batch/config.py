"""Configuration of the batch segmentation job (one typed object, CLI flags and YAML)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import InferenceConfig, load_yaml_mapping, merge_overrides, validate_config

# Named defaults (pinned by tests/test_batch_config.py).
DEFAULT_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
DEFAULT_PREPROCESS_CPUS = 1.0
DEFAULT_POSTPROCESS_CPUS = 1.0
DEFAULT_MODEL_CPUS = 1.0
#: memory reserved per read/preprocess and per postprocess task (a 512x512x300 CT needs < 2 GiB).
DEFAULT_STAGE_MEMORY_GB = 2.0
DEFAULT_MIN_ACTORS = 1
#: One model actor per GPU: the whole device's memory for the window batch; 2 lets one actor's host-side work
#: (receiving the model grid, returning labels) overlap the other's compute, at half the memory each.
DEFAULT_ACTORS_PER_GPU = 1
DEFAULT_MAX_ACTORS = 1
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_MAX_FAILURES = 0
DEFAULT_PROGRESS_INTERVAL_S = 10.0
#: The batch job renders a preview per volume unless told not to (``--no-preview``): a team that segments thousands
#: of scans judges them from pictures in the run report, and a preview costs well under 0.1 s per volume.
DEFAULT_BATCH_PREVIEW = True
#: Ray resource a model node advertises (``ray start --resources '{"nvseg_model_node": 1}'``); empty = any node.
DEFAULT_MODEL_NODE_RESOURCE = ""


class BatchConfig(BaseModel):
    """Everything ``jobs/batch_segment.py`` needs; ``inference`` holds the per-volume engine settings."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(..., description="folder/prefix, glob, single file, or manifest (.csv/.jsonl/.parquet)")
    output: str = Field(..., description="output folder/prefix; masks mirror the input's relative folders (DICOM "
                        "series: <study uid>/<series uid>); a DICOMweb root stores the SEGs into their studies")
    run_dir: str | None = Field(None, description="folder/prefix for manifests, reports and NIfTI masks when output "
                                "is a DICOMweb server (which stores DICOM objects only)")
    recursive: bool = Field(True, description="search folders/prefixes recursively")
    suffixes: tuple[str, ...] = DEFAULT_SUFFIXES
    inference: InferenceConfig = Field(default_factory=InferenceConfig)

    preprocess_cpus: float = Field(DEFAULT_PREPROCESS_CPUS, gt=0, description="CPUs per read/preprocess task")
    postprocess_cpus: float = Field(DEFAULT_POSTPROCESS_CPUS, gt=0, description="CPUs per invert/encode/write task")
    stage_memory_gb: float = Field(DEFAULT_STAGE_MEMORY_GB, gt=0, description="memory reserved per CPU-stage task")
    model_cpus: float = Field(DEFAULT_MODEL_CPUS, gt=0, description="CPUs per model actor")
    model_gpus: float | None = Field(None, ge=0, description="GPUs per model actor; None = 1 when the cluster has GPUs")
    actors_per_gpu: int = Field(DEFAULT_ACTORS_PER_GPU, ge=1, le=2, description="model actors sharing one GPU when "
                                "model_gpus is not set: 2 overlaps one volume's host work with another's compute")
    min_actors: int = Field(DEFAULT_MIN_ACTORS, ge=1)
    max_actors: int = Field(DEFAULT_MAX_ACTORS, ge=1)
    model_node_resource: str = Field(DEFAULT_MODEL_NODE_RESOURCE,
                                     description="custom Ray resource that pins model actors to model nodes")
    cpu_node_resource: str = Field("", description="custom Ray resource that pins CPU stages to CPU nodes")
    max_in_flight: int | None = Field(None, ge=1, description="most volumes between read and written mask "
                                      "(bounds memory); None = 3 per model actor + 1 per CPU-stage slot (at least 2)")
    max_attempts: int = Field(DEFAULT_MAX_ATTEMPTS, ge=1, description="model attempts per volume if actors die")
    max_failures: int = Field(DEFAULT_MAX_FAILURES, ge=-1, description="failed volumes tolerated (exit 0); -1 = any")
    progress_interval_s: float = Field(DEFAULT_PROGRESS_INTERVAL_S, gt=0)
    progress_bars: bool = Field(True, description="status lines also show how many volumes are in each stage")
    wait_for_resources: bool | None = Field(
        None, description="let resource requests no node can satisfy wait for an autoscaler to add nodes; "
        "False fails fast (exit 2) before any work; None = wait only under KubeRay (its autoscaler)")
    run_name: str | None = Field(None, description="name of this run's manifest folder; default: a timestamp")
    run_report: bool = Field(True, description="write the browsable run report <run folder>/report.html")
    cost_per_node_hour: float | None = Field(None, ge=0, description="price of one node for an hour (any currency): "
                                             "the summary and the run report then show the cost per volume")
    ray_address: str | None = Field(None, description="Ray cluster address; default: RAY_ADDRESS or a local Ray")

    @property
    def files_root(self) -> str:
        """Where masks, reports and manifests go: ``output``, or ``run_dir`` when ``output`` is DICOMweb."""
        return self.run_dir if self.seg_root else self.output

    @property
    def seg_root(self) -> str | None:
        """The DICOMweb root SEGs are stored to (STOW-RS), or None when they are files next to the masks."""
        from ..dicom.dicomweb import is_dicomweb_url

        return self.output if is_dicomweb_url(self.output) else None

    @model_validator(mode="after")
    def _batch_preview(self) -> BatchConfig:
        if self.inference.quality.preview is None:
            self.inference.quality.preview = DEFAULT_BATCH_PREVIEW
        return self

    @model_validator(mode="after")
    def _actors_ordered(self) -> BatchConfig:
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) > max_actors ({self.max_actors})")
        if not self.inference.checkpoint:
            raise ValueError("inference.checkpoint is required (--checkpoint PATH_OR_URI)")
        if self.seg_root and not self.run_dir:
            raise ValueError("output is a DICOMweb server, which stores the SEGs only: give --run-dir FOLDER_OR_URI "
                             "for the run manifest and the per-series reports (resume reads them)")
        return self

    @classmethod
    def from_sources(cls, yaml_path: str | Path | None = None, *, inference: dict[str, Any] | None = None,
                     **overrides: Any) -> BatchConfig:
        """Defaults < YAML (top level + an ``inference:`` mapping) < overrides; ``None`` overrides are ignored."""
        data: dict[str, Any] = load_yaml_mapping(yaml_path) if yaml_path is not None else {}
        data = merge_overrides(data, overrides)
        data["inference"] = merge_overrides(dict(data.get("inference") or {}), inference or {})
        return validate_config(cls, data, source=str(yaml_path) if yaml_path else "options")
