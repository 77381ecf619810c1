# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Progress of the long loops (a cohort's pairs, the affine stage, instance optimisation, the field refinement).

On an interactive terminal a person waits and watches: :class:`Progress` shows a ``tqdm`` bar with the rate and the
time left, and the loop's per-step log lines are left out (the bar shows the loss instead; every other log record is
printed above the bars, ``tqdm.contrib.logging``). Anywhere else (a log file, a pipe, a batch job, torchrun's captured
output) there is no bar and the loop logs its plain lines as before, so logs stay greppable. Only the process of
global rank 0 draws bars: the ranks of a torchrun launch share one terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
from typing import IO, Any

#: bars open in this process (nested loops: a cohort's pair bar holds the refinement bar of its pair)
_open_bars = 0


def interactive_terminal(stream: IO[str] | None = None) -> bool:
    """True when ``stream`` (default ``sys.stderr``) is a terminal and this process is rank 0 (``RANK`` of torchrun,
    0 without it)."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        tty = bool(isatty and isatty())
    except ValueError:  # a closed stream
        tty = False
    return tty and int(os.environ.get("RANK", "0") or 0) == 0


class Progress:
    """A bar with ETA over ``total`` steps on an interactive terminal, nothing elsewhere.

    Use as a context manager around the loop; call :meth:`update` after each step. :attr:`active` tells the loop
    whether a bar is shown, i.e. whether to skip its own per-step log lines.

    Args:
        total: number of steps (a bar with ``total`` 0 is never shown).
        description: what is counted, e.g. ``"refinement"``; shown left of the bar.
        unit: the name of one step (``"step"``, ``"pair"``).
        stream: where the bar is drawn (default ``sys.stderr``); decides whether it is a terminal.
        enabled: force the bar on or off (default: :func:`interactive_terminal` of ``stream``).
    """

    def __init__(
        self,
        total: int,
        description: str,
        unit: str = "step",
        stream: IO[str] | None = None,
        enabled: bool | None = None,
    ) -> None:
        self.total = int(total)
        self.description = description
        self.unit = unit
        self.stream = sys.stderr if stream is None else stream
        show = interactive_terminal(self.stream) if enabled is None else bool(enabled)
        self.active = show and self.total > 0
        self._bar: Any = None
        self._redirect: contextlib.ExitStack | None = None

    def __enter__(self) -> Progress:
        global _open_bars
        if not self.active:
            return self
        from tqdm import tqdm

        if _open_bars == 0:  # the outermost bar sends the console log records through tqdm.write, above the bars
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect = contextlib.ExitStack()
            self._redirect.enter_context(logging_redirect_tqdm(loggers=[logging.getLogger()], tqdm_class=tqdm))
        # an inner bar (one pair's steps under the cohort's pairs) is drawn below and removed when done
        # the terminal's size now (COLUMNS/LINES, else the terminal's own, else 100 x 24): a pseudo-terminal may report
        # 0 x 0, on which tqdm draws nothing (no column for the bar, no row for its position)
        size = shutil.get_terminal_size(fallback=(100, 24))
        self._bar = tqdm(total=self.total, desc=self.description, unit=self.unit, file=self.stream,
                         leave=_open_bars == 0, ncols=size.columns or 100, nrows=size.lines or 24)
        _open_bars += 1
        return self

    def update(self, steps: int = 1, **values: Any) -> None:
        """Advance by ``steps``; ``values`` (e.g. ``loss=0.12``) are shown after the bar."""
        if self._bar is None:
            return
        if values:
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in values.items()},
                                  refresh=False)
        self._bar.update(steps)

    def __exit__(self, *exc_info: Any) -> None:
        global _open_bars
        if self._bar is None:
            return
        self._bar.close()
        self._bar = None
        _open_bars -= 1
        if self._redirect is not None:
            self._redirect.close()
            self._redirect = None
