"""Memory estimates per InferenceModel, cached by (uid, generation): reading a model header is file
I/O, and a spec that has not changed cannot change its estimate."""

from __future__ import annotations

from vnpu.memory import EstimateError, MemoryEstimate, estimate_from_spec
from vnpu.operator.state import ObservedModel


class EstimateCache:
    def __init__(self, cache_dir: str | None = None) -> None:
        self.cache_dir = cache_dir
        self._entries: dict[tuple[str, int], MemoryEstimate | EstimateError] = {}

    def get(self, model: ObservedModel) -> MemoryEstimate | EstimateError:
        """The estimate, or the EstimateError explaining what the spec lacks (also cached)."""
        key = (model.uid, model.generation)
        if key not in self._entries:
            try:
                self._entries[key] = estimate_from_spec(model.spec, cache_dir=self.cache_dir)
            except EstimateError as exc:
                self._entries[key] = exc
            except OSError as exc:
                self._entries[key] = EstimateError(f"spec.source.uri could not be read: {exc}")
            live = {k for k in self._entries if k[0] != model.uid or k == key}
            self._entries = {k: v for k, v in self._entries.items() if k in live}
        return self._entries[key]
