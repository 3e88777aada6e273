"""Human output on stderr (rich), one JSON document on stdout, redaction of sensitive text.

Progress: in a terminal, one live display for the whole command (``Output.live``) where each
stage shows a bar with its ETA and leaves a one-line "done" record; elsewhere (CI logs, pipes)
plain lines, at most one every ``PLAIN_EVERY`` seconds per stage, and no blank lines.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

PLAIN_EVERY = 10.0  # seconds between two plain progress lines of one stage


def short_hash(text: str) -> str:
    """A short, stable tag for a sensitive string (8 hex chars of its sha256).

    Args:
        text: the sensitive string.

    Returns:
        e.g. ``"#3fa2c1d0"``; the same text always gives the same tag.
    """
    return "#" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


@dataclass
class Output:
    """Where a command's output goes.

    Args:
        json_mode: print one JSON document on stdout at the end instead of tables.
        reveal: show sensitive request text instead of redacting it.
        quiet: no progress (also implied by json_mode).
    """

    json_mode: bool = False
    reveal: bool = False
    quiet: bool = False
    # soft wrap: a long line stays one line in a log (a terminal wraps it itself)
    err: Console = field(default_factory=lambda: Console(stderr=True, highlight=False, soft_wrap=True))
    _live: Progress | None = field(default=None, repr=False)

    def redact(self, text: str, rid: str | None = None) -> str:
        """``id: text`` with ``--reveal``, else the request id plus a short hash of the text."""
        if self.reveal:
            return f"{rid}: {text}" if rid else text
        return f"{rid}{short_hash(text)}" if rid else short_hash(text)

    def info(self, message: str) -> None:
        """A status line on stderr (suppressed in JSON and quiet mode)."""
        if not (self.json_mode or self.quiet):
            self.err.print(message)

    def warn(self, message: str) -> None:
        """A warning on stderr, shown in every mode."""
        self.err.print(f"[yellow]warning:[/yellow] {message}")

    def emit_json(self, document: Any) -> None:
        """Print one JSON document on stdout."""
        sys.stdout.write(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")
        sys.stdout.flush()

    @property
    def shows_progress(self) -> bool:
        """Whether progress is shown at all."""
        return not (self.quiet or self.json_mode)

    @contextlib.contextmanager
    def live(self) -> Iterator[None]:
        """One live progress display for the whole command, in a terminal; nothing elsewhere."""
        if not self.shows_progress or not self.err.is_terminal or self._live is not None:
            yield
            return
        self._live = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.err,
                              transient=True)
        try:
            with self._live:
                yield
        finally:
            self._live = None

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        """A stage with progress on stderr; yields ``advance(n=1)``.

        Args:
            description: what is being done ("statistics", "loading the model").
            total: number of steps, or None when unknown (a spinner).
        """
        if not self.shows_progress:
            yield lambda n=1: None
            return
        t0 = time.perf_counter()
        if self._live is not None:
            task = self._live.add_task(description, total=total)
            try:
                yield lambda n=1: self._live.advance(task, n)
            finally:
                self._live.remove_task(task)
            self.err.print(f"[green]✓[/green] {description} [dim]({time.perf_counter() - t0:.1f}s)[/dim]")
            return
        yield _plain_advance(self.err, description, total, t0)
        self.err.print(f"{description}: done in {time.perf_counter() - t0:.1f}s")

    def stage(self, description: str):
        """A stage without a step count (``progress`` with a spinner)."""
        return self.progress(description, None)


def _plain_advance(err: Console, description: str, total: int | None, t0: float) -> Callable[..., None]:
    """``advance`` for a non-terminal: a start line, then a count line at most every PLAIN_EVERY seconds."""
    err.print(f"{description} ..." + (f" (0/{total})" if total else ""))
    state = {"done": 0, "said": t0}

    def advance(n: int = 1) -> None:
        state["done"] += n
        now = time.perf_counter()
        if now - state["said"] >= PLAIN_EVERY:
            state["said"] = now
            eta = ""
            if total and state["done"]:
                eta = f", eta {(now - t0) / state['done'] * (total - state['done']):.0f}s"
            err.print(f"{description}: {state['done']}" + (f"/{total}" if total else "") + eta)

    return advance


def silent() -> Output:
    """An Output that shows nothing (library use and tests)."""
    return Output(quiet=True, err=Console(stderr=True, quiet=True))
