"""Background threads whose death is an error at once, never a timeout.

A ``WorkerThread`` runs one loop. If the loop ends by an exception (a bug, MemoryError, a closed
ZMQ context), the exception is kept and ``check()`` raises ``BackgroundThreadDied`` naming the
thread and that exception; the owners call ``check()`` first in every public method and the
loop's ``on_death`` wakes anyone waiting, so a caller blocked in ``take`` or ``flush`` learns of
it within its wait's next wake-up instead of running into its timeout.
"""

from __future__ import annotations

import logging
import pickle
import threading
import traceback
from collections.abc import Callable

log = logging.getLogger("routing_replay.wire")


class BackgroundThreadDied(RuntimeError):
    """A background thread of ours ended by an exception; the object it served cannot work."""

    def __init__(self, thread_name: str, cause: BaseException) -> None:
        super().__init__(f"background thread {thread_name!r} died: {type(cause).__name__}: {cause}")
        self.thread_name = thread_name
        self.cause = cause

    def __reduce__(self):
        # Ray carries exceptions between processes by pickling them (its transport, not a socket of
        # ours): rebuilt from both arguments, so the driver sees this class, not an opaque wrapper.
        return type(self), (self.thread_name, _portable(self.cause))


def _portable(cause: BaseException) -> BaseException:
    """``cause`` if it can be rebuilt in another process, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(cause))
    except Exception:  # noqa: BLE001 - any exception type may refuse to be pickled, in its own way
        return RuntimeError(f"{type(cause).__name__}: {cause}")
    return cause


class WorkerThread:
    """A daemon thread running ``loop``; ``on_death`` is called (in the thread) if it raises."""

    def __init__(self, name: str, loop: Callable[[], None], on_death: Callable[[], None]) -> None:
        self.name = name
        self._loop = loop
        self._on_death = on_death
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def check(self) -> None:
        """Raises BackgroundThreadDied if the loop ended by an exception."""
        if self.error is not None:
            raise BackgroundThreadDied(self.name, self.error) from self.error

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - kept and re-raised to every caller, never swallowed
            self.error = exc
            log.critical("background thread %r died:\n%s", self.name, "".join(traceback.format_exception(exc)))
            try:
                self._on_death()
            except BaseException:  # noqa: BLE001 - the death is already recorded and logged
                log.exception("waking the callers of %r failed", self.name)


def log_rate_limited(logger: logging.Logger, count: int, message: str, *args: object) -> None:
    """Logs the 1st..10th occurrence of a reason, then every 100th: a flood of bad input is visible
    in the log without flooding it (``count`` is the reason's running total, kept by the caller)."""
    if count <= 10 or count % 100 == 0:
        logger.warning(message + " (#%d of this kind)", *args, count)
