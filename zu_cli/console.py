"""Human output on stderr (rich), one JSON document on stdout, redaction of sensitive text."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


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
        quiet: no progress bars (also implied by json_mode).
    """

    json_mode: bool = False
    reveal: bool = False
    quiet: bool = False
    err: Console = field(default_factory=lambda: Console(stderr=True, highlight=False))

    def redact(self, text: str, rid: str | None = None) -> str:
        """``id: text`` with ``--reveal``, else the request id plus a short hash of the text."""
        if self.reveal:
            return f"{rid}: {text}" if rid else text
        return f"{rid}{short_hash(text)}" if rid else short_hash(text)

    def info(self, message: str) -> None:
        """A status line on stderr (suppressed in JSON mode)."""
        if not self.json_mode:
            self.err.print(message)

    def warn(self, message: str) -> None:
        """A warning on stderr, shown in every mode."""
        self.err.print(f"[yellow]warning:[/yellow] {message}")

    def emit_json(self, document: Any) -> None:
        """Print one JSON document on stdout."""
        sys.stdout.write(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")
        sys.stdout.flush()

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Any]:
        """A progress bar on stderr; yields a callable ``advance(n=1)``.

        Args:
            description: what is being done.
            total: number of steps, or None when unknown.
        """
        if self.quiet or self.json_mode:
            yield lambda n=1: None
            return
        bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                       TimeElapsedColumn(), console=self.err, transient=True)
        with bar:
            task = bar.add_task(description, total=total)
            yield lambda n=1: bar.advance(task, n)


def silent() -> Output:
    """An Output that shows nothing (library use and tests)."""
    return Output(quiet=True, err=Console(stderr=True, quiet=True))
