"""Iterating calibration batches, the same way in every front end: an optional tqdm bar and a cap."""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional

from tqdm.auto import tqdm


def iterate_batches(batches: Iterable[Any], num_batches: Optional[int], progress: bool,
                    desc: str) -> Iterator[tuple[int, Any]]:
    """``(index, batch)`` for the first ``num_batches`` batches (all if ``None``), behind a tqdm bar
    labelled ``desc`` when ``progress`` (its total: ``num_batches``, else ``len(batches)`` if known)."""
    total = num_batches if num_batches is not None else (len(batches) if hasattr(batches, "__len__") else None)
    iterator = iter(batches)
    if progress:
        iterator = tqdm(iterator, total=total, desc=desc, leave=False)
    for i, batch in enumerate(iterator):
        if num_batches is not None and i >= num_batches:
            break
        yield i, batch
