"""Evaluation of a checkpoint on a labelled data list: Dice per case and class, on the ORIGINAL grid.

This is upstream ``evaluate.json`` (docs/upstream.md, Training and evaluation) on Ray: every case is segmented
by the engine (which already inverts the prediction back onto the input voxel grid, nearest-neighbour), its
ground truth is relabelled local -> global with the label mapping (default ``[[1, 3]]``, MSD spleen -> spleen), and the Dice
of every mapped global class is computed at the original spacing, exactly where upstream computes it.

Differences from upstream, on purpose:

* Every mapped class counts in the means. Upstream's ``MeanDice(include_background=False)`` on a K-class
  index map skips the last class (docs/upstream.md, Upstream bugs, item 11).
* A class absent from both prediction and truth of a case has an undefined Dice: it is reported as NaN
  (``null`` in JSON) and left out of the means, instead of counting as 1 or 0.
* Per-case failures (unreadable file, label off the image grid, ...) do not stop the run: the case is
  recorded with its error code and the job exits 3.

Outputs (``<output>/``): ``per_case.parquet`` and ``per_case.csv`` (one row per case and class),
``per_class.csv`` and ``summary.json``.
"""

from .config import DEFAULT_LABEL_MAPPING, EvaluateConfig, Split, select_items
from .dice import CASE_COLUMNS, CODE_MULTICHANNEL, dice, evaluate_case, format_summary, summarize
from .runner import CODE_INTERNAL, CODE_PIPELINE_ERROR, EvaluationResult, run_evaluation

__all__ = [
    "CASE_COLUMNS",
    "CODE_INTERNAL",
    "CODE_MULTICHANNEL",
    "CODE_PIPELINE_ERROR",
    "DEFAULT_LABEL_MAPPING",
    "EvaluateConfig",
    "EvaluationResult",
    "Split",
    "dice",
    "evaluate_case",
    "format_summary",
    "run_evaluation",
    "select_items",
    "summarize",
]
