"""What a model back-end gives the daemon: its stages, voices, languages, sample rate and warm-up.

The pipeline and the doors know only this. Kokoro supplies G2P → acoustic → vocoder; an LM-based
engine would supply, say, text → codec tokens → streaming decoder, with its own items in between.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from speakd.server.pipeline.pipeline import WarmUpStep
from speakd.server.pipeline.stage import StageSpec


class SpeechBackend(Protocol):
    """A loaded model, ready to serve; immutable once loaded."""

    @property
    def model_id(self) -> str:
        """The name clients see for this model (OpenAI's `model`, /v1/models)."""
        ...

    @property
    def attribution(self) -> tuple[str, str]:
        """Who made the model and where it comes from, (name, URL): for doors that credit it (Wyoming)."""
        ...

    @property
    def sample_rate(self) -> int:
        """Rate of the waveforms the last stage yields."""
        ...

    @property
    def voice_names(self) -> Sequence[str]: ...

    @property
    def languages(self) -> Sequence[str]: ...

    def language_for(self, voice: str) -> str:
        """The language a voice speaks when a door does not say (OpenAI's API has no language field)."""
        ...

    @property
    def max_batch(self) -> int:
        """Items per batch in the batched stages that this engine does well with."""
        ...

    def stages(self) -> list[StageSpec]:
        """Fresh stage specs for one pipeline: `TextItem`s in, `WaveformItem`s out."""
        ...

    def warm_up(self, voice: str) -> tuple[list[WarmUpStep], Any]:
        """Blocking (may run G2P): the steps `Pipeline.warm_up` runs, and the first step's input."""
        ...
