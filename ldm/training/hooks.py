"""Where tests look inside a training run. Each hook does nothing here; a test replaces it, with
`monkeypatch.setattr(hooks, "weights", ...)` in-process, or from a small script that sets it and
then calls the training script's main() when the run is a subprocess (accelerate launch, a kill).
Callers look the hooks up on this module at each call, so a replacement takes effect."""
from __future__ import annotations

from pathlib import Path


def weights(tag: str, state_dict: dict, process_index: int) -> None:
    """Every process, with the model's weights: tag "start" once the run has started or resumed,
    "end" after the last step."""


def checkpoint_written(step: int, folder: Path) -> None:
    """The main process, when the state of the checkpoint at `step` is in its temporary folder and
    not yet renamed into place: a test can kill the run here."""
