"""The ``nvseg`` command line: ``batch`` is an ordinary sub-command (``--debug`` on either side of it, messages
prefixed ``nvseg batch``) with the same options as ``jobs/batch_segment.py``; internal errors are redacted.

The failures below are bad options found before any Ray is started (exit 2).
"""

from __future__ import annotations

import argparse

import pytest

from nvseg_ray.batch.cli import build_parser as job_parser
from nvseg_ray.batch.cli import main as job_main
from nvseg_ray.boundary import guarded
from nvseg_ray.cli import build_parser, main
from nvseg_ray.errors import EXIT_INTERNAL, EXIT_INVALID


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def _batch_subparser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["batch"]


@pytest.mark.parametrize("argv", [
    ["--debug", "batch", "--input", "{tmp}", "--output", "{tmp}/out"],  # the README's `nvseg --debug` advice
    ["batch", "--debug", "--input", "{tmp}", "--output", "{tmp}/out"],
    ["batch", "--input", "{tmp}", "--output", "{tmp}/out"],
])
def test_nvseg_batch_is_a_subcommand(argv, tmp_path, capsys):
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == EXIT_INVALID, err
    assert err.startswith("nvseg batch: [invalid_config]") and "checkpoint is required" in err, err
    assert "unrecognized arguments" not in err and "batch_segment" not in err


def test_debug_reaches_batch_from_either_side():
    assert build_parser().parse_args(["--debug", "batch", "--input", "x"]).debug is True
    assert build_parser().parse_args(["batch", "--debug", "--input", "x"]).debug is True
    assert build_parser().parse_args(["batch", "--input", "x"]).debug is False


def test_nvseg_batch_and_the_job_share_their_options():
    assert _options(_batch_subparser()) == _options(job_parser())
    assert "--input" in _options(job_parser()) and "--max-failures" in _options(job_parser())


def test_the_job_keeps_its_own_prefix(tmp_path, capsys):
    assert job_main(["--input", str(tmp_path), "--output", str(tmp_path / "out")]) == EXIT_INVALID
    assert capsys.readouterr().err.startswith("batch_segment: [invalid_config]")


def test_internal_errors_are_redacted_and_traceback_free(capsys):
    def boom() -> int:
        raise RuntimeError("could not open s3://AKIAEXAMPLE:hunter2@bucket/ct/a.nii.gz")

    assert guarded("nvseg segment", boom) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert err.startswith("nvseg segment: internal error: RuntimeError:") and "--debug" in err
    assert "hunter2" not in err and "Traceback" not in err

