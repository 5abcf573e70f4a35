"""What ``experiments/run.py`` and the callbacks may ask of a stage module: small ``typing.Protocol``s, checked with
``isinstance`` instead of probing attributes one by one. A stage offers a contract by having its members."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, NotRequired, Optional, Protocol, TypedDict, runtime_checkable


@runtime_checkable
class KeepsTestTable(Protocol):
    """A stage whose ``trainer.test`` keeps per-image rows (``lightning_modules.metrics.MetricTable``): run.py writes
    them to ``metrics/test.csv`` and ``test.json``."""

    test_table: Any


@runtime_checkable
class SummarisesTests(Protocol):
    """A stage with a one-row Markdown summary of its test means (``metrics/summary.md``)."""

    def summary_markdown(self) -> str: ...


@runtime_checkable
class WritesInversions(Protocol):
    """A stage that runs ``mode=invert``: its ``predict_step`` returns per-image results (the layout that
    ``callbacks.inversion_writer.InversionWriter.write_on_batch_end`` reads) and writes nothing itself. run.py builds
    the writer with ``result_settings()`` (what defines a result, stored in every record) and hands it to the Trainer;
    at predict start the writer sets ``is_finished`` (image name -> finished by an earlier run with the same settings:
    skip it), None outside ``trainer.predict``."""

    is_finished: Optional[Callable[[str], bool]]

    def result_settings(self) -> Dict[str, Any]: ...


@runtime_checkable
class DrawsEditGrids(Protocol):
    """A stage that draws the edit grid of its first test batch: ``callbacks.edit_grid.EditGrid`` sets
    ``edit_grid_request`` ({"strengths", "n_columns", "n"}) at test start and reads ``edit_grid_batch`` at the end."""

    edit_grid_request: Optional[Dict[str, Any]]
    edit_grid_batch: Optional[Dict[str, Dict[str, Any]]]


class StepPictures(TypedDict):
    """What a stage's ``validation_step`` / ``test_step`` returns for ``callbacks.wandb_tables.WandbMetricTable``:
    the batch's image ``names``, its per-image ``metrics`` ({metric: (B,) tensor}) and ``pictures`` ({key: (B, C, H,
    W)}: "input", "output" / "reconstruction", "edit", ... in [-1, 1]; "mask" (prediction) and "ood_mask" (ground
    truth) in [0, 1], 1 = out of domain); optionally ``edit_pictures``, a callable returning more pictures (stage 3: its
    output edits), called only when the table keeps one of the batch's images."""

    names: List[str]
    metrics: Dict[str, Any]
    pictures: Dict[str, Any]
    edit_pictures: NotRequired[Callable[[], Dict[str, Any]]]
