"""Progress bars for long loops (training steps, generation batches)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@contextlib.contextmanager
def progress_bar(total: int, description: str, *, start: int = 0) -> Iterator[
        Callable[..., None]]:
    """A rich progress bar on stderr (silent when stderr is not a terminal, and in every
    process of a several-process run but rank 0: N bars would fight over one terminal).

    Yields ``show(step, info="")`` that moves the bar to ``step`` with a short status text.
    """
    console = Console(stderr=True)
    other_rank = os.environ.get("RANK", "0") not in ("", "0")  # torch.distributed's rank
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                  console=console, disable=other_rank or not console.is_terminal) as progress:
        task = progress.add_task(description, total=total, completed=start, info="")

        def show(step: int, info: str = "") -> None:
            progress.update(task, completed=step, info=info)

        yield show
