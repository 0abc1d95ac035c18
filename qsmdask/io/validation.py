"""The official BIDS validator (``bids-validator-deno``, PyPI) on the input dataset.

:func:`validate_bids` runs ``bids-validator-deno DIR --format json`` (schema bundled, works
offline) and splits its *errors* (severity ``error``; warnings are not faults) into

- dataset-level errors (``dataset_description.json``, ``participants.tsv``, a missing file
  the dataset needs, ...): the dataset cannot be trusted, the run stops
  (:class:`BIDSValidationError`);
- errors located under a ``sub-*`` folder, stray entries the specification does not
  include (``NOT_INCLUDED``) anywhere, and ``participants.tsv`` not listing every ``sub-*``
  folder (``PARTICIPANT_ID_MISMATCH``, also caused by a stray ``sub-01_old``): handed to the
  participant level, where an
  acquisition reading such a file fails alone (stage ``validate``) and errors in files
  qsmdask does not read are logged as warnings (see
  :func:`qsmdask.workflows.cohort.apply_validation_errors`).

Without the validator installed, :func:`validate_bids` returns None and qsmdask's own checks
(:mod:`qsmdask.io.bids`) are all there is.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["VALIDATOR", "BIDSValidationError", "ValidationResult", "validator_available", "validate_bids"]

VALIDATOR = "bids-validator-deno"
_SUBJECT_PATH = re.compile(r"^/sub-[^/]+/")

#: Errors that never stop the run wherever they are located: a stray entry the specification
#: does not include, and participants.tsv not listing every ``sub-*`` folder (a stray
#: ``sub-01_old`` counts as one; qsmdask matches participants to subjects itself).
_CONFINED_CODES = {"NOT_INCLUDED", "PARTICIPANT_ID_MISMATCH"}


class BIDSValidationError(ValueError):
    """The BIDS validator found errors that concern the whole dataset."""


@dataclass
class ValidationResult:
    """Errors of one validator run: ``dataset`` stops the run, ``files`` are per file."""

    dataset: list[dict] = field(default_factory=list)
    files: list[dict] = field(default_factory=list)
    n_warnings: int = 0
    version: str = ""


def validator_available() -> bool:
    return shutil.which(VALIDATOR) is not None


def _issue(i: dict) -> dict:
    code = i.get("code", "")
    sub = i.get("subCode")
    text = (i.get("issueMessage") or "").strip().splitlines()
    msg = code + (f" ({sub})" if sub else "") + (f": {text[0]}" if text else "")
    return {"location": i.get("location") or "/", "code": code, "message": msg}


def validate_bids(bids_dir, *, timeout_s: float = 900.0) -> ValidationResult | None:
    """Run the official validator on ``bids_dir``; None when it is not installed.

    Raises RuntimeError when the validator itself fails (no JSON output, timeout).
    """
    exe = shutil.which(VALIDATOR)
    if exe is None:
        return None
    cmd = [exe, str(Path(bids_dir)), "--format", "json"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{VALIDATOR} did not finish within {timeout_s:.0f} s on {bids_dir}; "
                           "use --skip-bids-validation to run without it") from None
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        tail = (proc.stderr or proc.stdout).strip()[-500:]
        raise RuntimeError(f"{VALIDATOR} failed on {bids_dir} (exit {proc.returncode}): {tail}") from None
    res = ValidationResult(version=str(report.get("summary", {}).get("schemaVersion", "")))
    for i in report.get("issues", {}).get("issues", []):
        if i.get("severity") != "error":
            res.n_warnings += 1
            continue
        it = _issue(i)
        loc = it["location"]
        # under a sub-* folder (valid or stray), or a stray entry anywhere: confined to it
        if _SUBJECT_PATH.match(loc) or it["code"] in _CONFINED_CODES:
            res.files.append(it)
        else:
            res.dataset.append(it)
    return res


def dataset_error_message(bids_dir, errors: list[dict], *, shown: int = 5) -> str:
    lines = [f"{bids_dir}: the BIDS validator ({VALIDATOR}) found {len(errors)} dataset-level error(s):"]
    lines += [f"  {e['location']}: {e['message']}" for e in errors[:shown]]
    if len(errors) > shown:
        lines.append(f"  ... and {len(errors) - shown} more (run `{VALIDATOR} {bids_dir}` to see all)")
    lines.append("Fix the dataset, or run with --skip-bids-validation to use qsmdask's own checks only.")
    return "\n".join(lines)
