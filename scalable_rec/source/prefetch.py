"""A bounded background iterator: the next cursor batches are fetched while the current one is
converted (``ExportConfig.export_prefetch``)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any


class Prefetcher:
    """Runs an iterator in a daemon thread, handing items over through a bounded queue.

    The worker is at most ``depth`` items ahead (plus the one it is producing). An error in
    the worker is re-raised in the consumer; closing the prefetcher stops the worker and
    closes the iterator there (so its ``finally`` blocks, e.g. cursor cleanup, run).

    Args:
        items: The iterator to run in the background.
        depth: Queue size.
    """

    def __init__(self, items: Iterator[Any], depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), name="arango-prefetch", daemon=True)
        self._thread.start()

    def _put(self, message: tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer thread
            self._put(("error", err))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator[Any]:
        while True:
            kind, value = self._queue.get()
            if kind == "item":
                yield value
            elif kind == "end":
                return
            else:
                raise value

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
