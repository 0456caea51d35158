"""Progress of a training epoch: a tqdm bar on a terminal, plain lines in a log."""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional


class Progress:
    """A tqdm bar on a terminal; plain ``step i/n`` lines otherwise.

    Plain lines come at the first step, then whenever ``log_seconds`` have passed since the last
    line, every ``log_every`` steps if that is set, and at the last step: a log file shows that
    the run is alive within seconds, and then about twice a minute.
    """

    def __init__(
        self,
        total: int,
        description: str,
        *,
        enabled: bool,
        log_seconds: float,
        log_every: Optional[int] = None,
        use_bar: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.description = description
        self.enabled = enabled
        self.log_seconds = log_seconds
        self.log_every = log_every
        self.clock = clock
        self.last_line = clock()
        self.bar = None
        if enabled and use_bar and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # plain lines then
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=description, leave=False, dynamic_ncols=True)

    def wants_update(self, step: int) -> bool:
        """Whether step ``step`` (1-based) should report (so the caller syncs a loss value only then)."""
        if not self.enabled:
            return False
        if step == 1 or step == self.total:
            return True
        if self.bar is not None:
            return step % 10 == 0
        if self.log_every is not None and step % self.log_every == 0:
            return True
        return self.clock() - self.last_line >= self.log_seconds

    def update(self, step: int, metrics: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(metrics, refresh=True)
        elif self.enabled:
            text = "  ".join(f"{key} {value}" for key, value in metrics.items())
            print(f"{self.description}  step {step}/{self.total}  {text}", flush=True)
            self.last_line = self.clock()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
