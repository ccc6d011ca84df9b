"""The pipeline's stages, in order: one module per stage, and :data:`STAGES`, the one list that orders them.

Each stage module (``riskbridge/stages/<name>.py``) owns its ledger queries (what is pending, how a decision is
recorded, how its outcomes are counted), its typed records, and its work, done with the connectors, harmonize and
model packages. It defines:

- ``work(context, run_id, items, progress) -> Counter``: do what is left of the stage for the run, record every
  decision before moving on, return the counts by outcome (done, skipped, quarantined, failed). ``items`` is the
  chunk to work on for a chunked stage, None otherwise. A stage run again does nothing it already did.
- ``counts(cursor, run_id) -> Counter``: the stage's outcomes for the whole run, from its own tables (the report).
- ``pending_items(context, run_id) -> list[str]``: only for a chunked stage, the items still to do.
- optionally ``warm_up(context) -> None``: load what the stage needs whatever its items (libraries, rule
  pipelines). When one process runs the stages in a row (``riskbridge run``), it runs on a thread while the stage
  before it runs, and that stage's end waits for it; the stage's ``work`` must not rely on it. It pays where the
  stage before waits on the network and leaves a core idle (retrieve before clinical); beside a stage that keeps the
  interpreter busy it only moves time (measured: warming clinical during discover and select saved nothing).

:data:`STAGES` drives :class:`riskbridge.pipeline.Pipeline`, the Airflow DAG factory (one task per stage, a
mapped task per chunk), the CLI's progress bars and ``--until``, and the report's stage table. Adding a stage is one
module plus one line here (docs/architecture.md has a worked example). This module imports nothing heavy, so an
Airflow DAG file can build its tasks from the list; a stage's module is imported when the stage runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from riskbridge.settings import RunSettings

__all__ = ["STAGES", "STAGE_NAMES", "Stage", "stage"]

_REQUIRED = ("work", "counts")


@dataclass(frozen=True)
class Stage:
    """One line of the stage list: the name (module ``riskbridge.stages.<name>``, ledger stage name, Airflow task id),
    the ``[run]`` setting of its chunk size when it is fanned out over chunks, and what it holds while it runs
    (``pacs``, ``fhir``, ``gpu`` or None), by which the DAG factory places its task (pools, queues, parallelism)."""

    name: str
    chunk_setting: str | None = None
    resource: str | None = None

    @property
    def chunked(self) -> bool:
        """True when the stage runs over chunks of pending items (one mapped Airflow task per chunk)."""
        return self.chunk_setting is not None

    @property
    def module(self) -> ModuleType:
        """The stage's module, imported on first use and checked to define what a stage must."""
        module = importlib.import_module(f"{__name__}.{self.name}")
        needed = (*_REQUIRED, "pending_items") if self.chunked else _REQUIRED
        missing = [name for name in needed if not callable(getattr(module, name, None))]
        if missing:
            raise TypeError(f"stage module {module.__name__} lacks {', '.join(missing)}")
        return module

    def chunk_size(self, run_settings: RunSettings) -> int:
        """The configured chunk size of a chunked stage, read from the ``[run]`` settings section."""
        if self.chunk_setting is None:
            raise ValueError(f"stage {self.name} is not chunked")
        return int(getattr(run_settings, self.chunk_setting))


STAGES: tuple[Stage, ...] = (
    Stage("discover", resource="pacs"),
    Stage("match", resource="fhir"),
    Stage("select", resource="pacs"),
    Stage("retrieve", chunk_setting="retrieve_chunk_size", resource="pacs"),
    Stage("clinical", chunk_setting="clinical_chunk_size", resource="fhir"),
    Stage("harmonize"),
    Stage("score", resource="gpu"),
    Stage("write_back", resource="fhir"),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def stage(name: str) -> Stage:
    """The stage of this name; ValueError naming the stages when there is none."""
    for candidate in STAGES:
        if candidate.name == name:
            return candidate
    raise ValueError(f"no stage {name!r}; the stages are {', '.join(STAGE_NAMES)}")
