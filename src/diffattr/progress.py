"""Progress of a long job in its log: steps done of total, rate and time left, printed at most every
`every` seconds (and at the last step), so that a person following a log sees how far a job is."""
from __future__ import annotations

import sys
import time


def duration(seconds: float) -> str:
    """'1h02m', '3m05s', '42s'."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class Progress:
    """`total` steps of `what` (e.g. 'training steps'), `done` of them already done (a resumed job):
    call `step()` after each; the rate counts the steps of this process only."""

    def __init__(self, total: int, what: str, done: int = 0, every: float = 10.0, stream=None, clock=time.monotonic):
        self.total, self.what, self.done, self.every = int(total), what, int(done), float(every)
        self.stream, self.clock = stream or sys.stdout, clock
        self.start = self.last = clock()
        self.first = self.done

    def step(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float) -> str:
        elapsed, steps = now - self.start, self.done - self.first
        rate = steps / elapsed if elapsed > 0 else float("inf")
        left = (self.total - self.done) / rate if steps and rate > 0 else float("nan")
        eta = duration(left) if left == left and left != float("inf") else "?"
        return (f"{self.what}: {self.done}/{self.total} ({100 * self.done / max(self.total, 1):.0f}%), "
                f"{rate:.3g}/s, {duration(elapsed)} elapsed, {eta} left")
