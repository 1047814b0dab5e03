"""The one progress bar every command shows (rich): what, bar, done/total, rate, elapsed, eta, note.

    bar = progress_bar(enabled, unit="tiles")
    with bar:
        task = bar.add_task("compress", total=n)
        bar.update(task, advance=k, note="loss 0.012")   # ``note`` is optional free text after the eta
"""

from __future__ import annotations

from typing import Any


def progress_bar(enabled: bool = True, *, unit: str = "tiles", transient: bool = False, stderr: bool = True,
                 terminal_only: bool = True) -> Any:
    """A ``rich.progress.Progress`` on stderr, never stdout (``wsicodec ... > out.txt`` or a pipe gets the
    results alone); prints nothing when ``enabled`` is false or (``terminal_only``, the default) when stderr
    is not a terminal, so logs stay clean. ``stderr`` is accepted for old callers; the bar is always on stderr."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class AverageRate(ProgressColumn):
        def render(self, task: Any) -> Text:
            # the average since the start: steadier than rich's windowed speed when batches arrive in bursts
            elapsed = task.finished_time if task.finished else task.elapsed
            done = task.completed - task.fields.get("start", 0)
            speed = done / elapsed if elapsed else 0.0
            return Text(f"{speed:.1f} {unit}/s")

    class Note(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(str(task.fields.get("note", "")))

    console = Console(stderr=True)
    show = enabled and (not terminal_only or console.is_terminal)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    AverageRate(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), Note(),
                    console=console, disable=not show, transient=transient)
