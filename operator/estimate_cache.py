"""Memory estimates per InferenceModel.

A success is cached by (uid, generation): reading a model header is file I/O, and a spec that has not
changed cannot change its estimate. A failure is not: it may be transient (an ``hf://`` cache on NFS
during a hiccup, a file being copied in), so it is retried with exponential backoff (1 s doubling to
5 minutes) until it works, and the planner keeps a running model's pods meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from vnpu import api
from vnpu.memory import EstimateError, MemoryEstimate, estimate_from_spec
from vnpu.operator.state import ObservedModel

log = logging.getLogger(__name__)

BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 300.0


@dataclass(frozen=True)
class _Failed:
    error: EstimateError
    retry_at: float
    attempts: int


class EstimateCache:
    def __init__(
        self,
        cache_dir: str | None = None,
        file_roots: tuple[str, ...] = (),
        clock: Callable[[], float] = time.monotonic,
        estimate: Callable[..., MemoryEstimate] = estimate_from_spec,
    ) -> None:
        self.cache_dir = cache_dir
        self.file_roots = file_roots
        self._clock = clock
        self._estimate = estimate
        self._ok: dict[tuple[str, int], MemoryEstimate] = {}
        self._failed: dict[tuple[str, int], _Failed] = {}

    def get(self, model: ObservedModel) -> MemoryEstimate | EstimateError:
        """The estimate, or the EstimateError explaining what went wrong (retried once its backoff ends)."""
        key = (model.uid, model.generation)
        if key in self._ok:
            return self._ok[key]
        failed = self._failed.get(key)
        if failed is not None and self._clock() < failed.retry_at:
            return failed.error
        try:
            estimate = self._estimate(
                model.raw_spec,
                cache_dir=self.cache_dir,
                file_roots=self.file_roots,
                block_size=api.KV_BLOCK_SIZE,  # sized as the runtime's paged pool is
            )
        except EstimateError as exc:
            error = exc
        except OSError as exc:
            error = EstimateError(f"spec.source.uri could not be read: {exc}")
        except Exception as exc:  # a bug or an input nobody foresaw: this model's failure, not the pass's
            log.exception(
                "estimating a model failed unexpectedly", extra={"model": f"{model.namespace}/{model.name}"}
            )
            error = EstimateError(f"the memory estimate failed unexpectedly: {exc!r}")
        else:
            self._ok[key] = estimate
            self._failed.pop(key, None)
            return estimate
        attempts = failed.attempts + 1 if failed else 1
        delay = min(MAX_BACKOFF_SECONDS, BACKOFF_SECONDS * 2 ** (attempts - 1))
        self._failed[key] = _Failed(error, self._clock() + delay, attempts)
        return error

    def retry_in(self, model: ObservedModel) -> float | None:
        """Seconds until a failed estimate of ``model`` is tried again (None: not failing)."""
        failed = self._failed.get((model.uid, model.generation))
        return None if failed is None else max(0.0, failed.retry_at - self._clock())

    def forget_except(self, models: Iterable[ObservedModel]) -> None:
        """Drop entries of models and generations that no longer exist."""
        live = {(m.uid, m.generation) for m in models}
        self._ok = {k: v for k, v in self._ok.items() if k in live}
        self._failed = {k: v for k, v in self._failed.items() if k in live}
