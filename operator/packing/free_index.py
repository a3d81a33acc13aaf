"""Free slices per device, bucketed so best-fit and largest-free are O(1)-ish bit operations."""

from __future__ import annotations

from collections.abc import Iterator, Sequence


class FreeIndex:
    """Devices eligible for one (selector, tolerations) signature, bucketed by free slices per slice
    size class. A bitmask of non-empty buckets makes best-fit and largest-free O(1)-ish queries."""

    def __init__(self, n_classes: int, max_slices: Sequence[int]) -> None:
        self.buckets: list[list[dict[int, None]]] = [
            [{} for _ in range(max_slices[c] + 1)] for c in range(n_classes)
        ]
        self.masks = [0] * n_classes
        self.largest_total = [0] * n_classes  #: the biggest eligible device of each class, in slices

    @classmethod
    def build(
        cls,
        n_classes: int,
        max_slices: Sequence[int],
        eligible: Sequence[int],
        free: Sequence[int],
        dev_cls: Sequence[int],
        dev_total: Sequence[int],
    ) -> FreeIndex:
        """An index over the ``eligible`` devices (in ordinal order within each bucket)."""
        index = cls(n_classes, max_slices)
        grouped: dict[tuple[int, int], list[int]] = {}
        for o in eligible:
            grouped.setdefault((dev_cls[o], free[o]), []).append(o)
            if dev_total[o] > index.largest_total[dev_cls[o]]:
                index.largest_total[dev_cls[o]] = dev_total[o]
        for (c, f), ordinals in grouped.items():
            index.buckets[c][f] = dict.fromkeys(ordinals)
            index.masks[c] |= 1 << f
        return index

    def add(self, cls: int, ordinal: int, free: int, total: int) -> None:
        self.buckets[cls][free][ordinal] = None
        self.masks[cls] |= 1 << free
        self.largest_total[cls] = max(self.largest_total[cls], total)

    def move(self, cls: int, ordinal: int, old: int, new: int) -> None:
        bucket = self.buckets[cls][old]
        del bucket[ordinal]
        if not bucket:
            self.masks[cls] &= ~(1 << old)
        self.buckets[cls][new][ordinal] = None
        self.masks[cls] |= 1 << new

    def best_fit(self, cls: int, need: int) -> int | None:
        """A device with the fewest free slices that are still >= ``need`` (first such in order)."""
        m = self.masks[cls] >> need
        if not m:
            return None
        v = need + (m & -m).bit_length() - 1
        return next(iter(self.buckets[cls][v]))

    def max_free(self, cls: int) -> int:
        return self.masks[cls].bit_length() - 1

    def walk(self, cls: int, need: int) -> Iterator[int]:
        """Devices with >= ``need`` free, tightest first."""
        m = self.masks[cls] >> need
        v = need
        while m:
            low = (m & -m).bit_length() - 1
            v += low
            m >>= low
            yield from self.buckets[cls][v]  # callers stop iterating before they change the index
            m >>= 1
            v += 1
