"""Errors for bad input data and the policy that decides what a bad record does to a run.

Every data error names the file, the record index inside it and the field that is wrong, so a user can
open the file and fix the record. Two policies (``DataConfig.bad_record_policy``):

* ``"error"`` (default): the first bad record raises; right for building or checking a dataset.
* ``"skip-and-count"``: the record is skipped, logged and counted; once more than
  ``max_skipped_records`` were skipped the run stops, since a broken dataset should not train quietly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger("chatterbox.data")


class DataError(ValueError):
    """A record that cannot be used: names ``file``, ``record`` (index or id) and ``field``."""

    def __init__(self, message: str, file: str = "?", record: int | str | None = None, field: str | None = None):
        self.file = str(file)
        self.record = record
        self.field = field
        self.reason = message
        where = self.file
        if record is not None:
            where += f" record {record}"
        if field is not None:
            where += f" field {field!r}"
        super().__init__(f"{where}: {message}")


class TooManyBadRecords(DataError):
    """``skip-and-count`` gave up: more bad records than ``max_skipped_records``."""


def sample_id(file: str, record: int | str) -> str:
    """How samples are named in batches and error messages: ``<source file>#<record index>``."""
    return f"{file}#{record}"


def parse_sample_id(sid: str) -> tuple[str, str]:
    file, _, record = sid.rpartition("#")
    return file, record


@dataclass
class BadRecordPolicy:
    """Applies ``"error"`` or ``"skip-and-count"`` and keeps the count of skipped records per reason.

    A record counts once however often it is met (a training mixture draws the same bad record again and
    again): ``skipped`` is the number of distinct bad records."""

    mode: str = "error"
    max_skipped_records: int = 1000
    by_reason: dict[str, int] = field(default_factory=dict)
    records: set = field(default_factory=set)  # (file, record, field) of every record skipped

    @property
    def skipped(self) -> int:
        return len(self.records)

    def __post_init__(self):
        if self.mode not in ("error", "skip-and-count"):
            raise ValueError(f"bad_record_policy must be 'error' or 'skip-and-count', got {self.mode!r}")
        if self.max_skipped_records < 0:
            raise ValueError("max_skipped_records must be >= 0")

    def handle(self, error: DataError) -> None:
        """Raise ``error`` (policy "error"), or count and log it; raise TooManyBadRecords past the bound."""
        if self.mode == "error":
            raise error
        record = (error.file, error.record, error.field)
        if record in self.records:
            return
        self.records.add(record)
        key = f"{error.file}:{error.field}"
        self.by_reason[key] = self.by_reason.get(key, 0) + 1
        logger.warning("skipped bad record (%d so far): %s", self.skipped, error)
        if self.skipped > self.max_skipped_records:
            raise TooManyBadRecords(
                f"more than max_skipped_records={self.max_skipped_records} bad records were skipped "
                f"(counts by file:field {self.by_reason}); last: {error.reason}",
                file=error.file, record=error.record, field=error.field,
            ) from error
