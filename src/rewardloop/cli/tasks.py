"""``rewardloop tasks create|progress``: comparison tasks from a candidates file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from rewardloop.cli._common import DB, input_file, read_text_file, resolve_db

ORDER = 12


def read_jsonl(path: Path, flag: str | None = None) -> tuple[list[dict[str, Any]], list[int]]:
    """JSON objects of a JSONL file and their 1-based line numbers, read by the shared strict
    reader (``data.sources``: blank lines skipped; file:line errors for bytes that are not
    UTF-8, bad JSON or a line that is not an object)."""
    from rewardloop.data.sources import Source, rows
    from rewardloop.errors import DataError

    found = list(rows(Source(str(path), (input_file(path, flag),))))
    if not found:
        raise DataError("no rows", path=str(path))
    return [obj for _, obj in found], [where.number for where, _ in found]


def _gold_places(n_rows: int, n_gold: int) -> list[int]:
    """Where each of ``n_gold`` gold rows goes among ``n_rows`` rows (before row index i), evenly
    spread: 10 rows and 1 gold row -> [5]; no rows -> all at 0."""
    return [round((j + 1) * n_rows / (n_gold + 1)) for j in range(n_gold)]


def register(app: typer.Typer) -> None:
    tasks = typer.Typer(help="Create comparison tasks and follow their progress.",
                        no_args_is_help=True)
    app.add_typer(tasks, name="tasks")

    @tasks.command("create")
    def create(
        file: Path = typer.Argument(..., help="Candidates JSONL: prompt, responses, models?"),
        kind: str = typer.Option("pairwise", "--kind", help="pairwise (one task per pair of "
                                 "answers) or ranking (one task ranking all answers of a row)."),
        overlap: int = typer.Option(1, "--overlap", help="Distinct annotators wanted per task."),
        pairing: str = typer.Option("all", "--pairing", help="For pairwise from 3+ answers: all "
                                    "pairs, or adjacent (1-2, 2-3, ...)."),
        gold: Path | None = typer.Option(
            None, "--gold", help="JSONL of gold rows (prompt, responses, ranking as groups of "
            "indices, best first): tasks with a known answer to check annotators."),
        guidelines: Path | None = typer.Option(
            None, "--guidelines", help="Markdown file shown to annotators with the batch."),
        batch: str | None = typer.Option(None, "--batch",
                                         help="Batch name (default: the file's stem)."),
        audience: str | None = typer.Option(
            None, "--audience", help="An annotator group: the tasks (not the gold ones) are "
            "handed only to its annotators (default: to everyone). See docs/groups.md."),
        db: str | None = DB,
    ) -> None:
        """Turn a candidates file into comparison tasks, all in one transaction."""
        from rewardloop.data.store import Store
        from rewardloop.errors import DataError
        from rewardloop.feedback import tasks as T
        from rewardloop.feedback.audience import check_audience

        rows, lines = read_jsonl(file)
        gold_rows, gold_lines = read_jsonl(gold, "--gold") if gold is not None else ([], [])
        rankings = {}
        for i, (row, line) in enumerate(zip(gold_rows, gold_lines, strict=True)):
            if "ranking" not in row:
                raise DataError("gold rows need a ranking", path=str(gold), line=line,
                                field="ranking")
            rankings[i] = row["ranking"]
        text = read_text_file(guidelines, "--guidelines") if guidelines else None
        store = Store(resolve_db(db))
        with store.write() as session:
            if audience is not None:
                check_audience(session, audience, overlap)
            b = T.get_or_create_batch(session, batch or file.stem, guidelines=text)
            held: list[int] = []  # comparisons the batch already has, or the file repeats
            made = []
            # Gold rows go evenly between the others: work is handed out oldest first, so gold
            # tasks made last would reach only whoever is still working at the end.
            start = 0
            for j, stop in enumerate(_gold_places(len(rows), len(gold_rows)) + [len(rows)]):
                made += T.create_tasks_from_candidates(
                    session, rows[start:stop], kind=kind, overlap=overlap, batch=b,
                    pairing=pairing, path=str(file), line_numbers=lines[start:stop],
                    audience=audience, skipped=held)
                start = stop
                if j < len(gold_rows):
                    made += T.create_tasks_from_candidates(
                        session, gold_rows[j:j + 1], kind=kind, overlap=overlap, batch=b,
                        gold={0: rankings[j]}, pairing=pairing, path=str(gold),
                        line_numbers=gold_lines[j:j + 1], skipped=held)
            name = b.name
        n_gold = sum(t.is_gold for t in made)
        typer.echo(f"created {len(made)} {kind} tasks ({n_gold} gold) in batch {name}, "
                   f"overlap {overlap}" + (f", for group {audience}" if audience else ""))
        if held:
            typer.echo(f"skipped {len(held)} comparisons that batch {name} already has or the "
                       "file repeats (to ask for them again as a new round, give --batch NAME)")

    @tasks.command("progress")
    def progress(batch: str | None = typer.Option(None, "--batch", help="Only this batch."),
                 db: str | None = DB) -> None:
        """Tasks, tasks complete, judgments and judgments per annotator."""
        from sqlalchemy import select

        from rewardloop.data.schema import Batch
        from rewardloop.data.store import Store
        from rewardloop.errors import UserError
        from rewardloop.feedback import tasks as T

        with Store(resolve_db(db), existing=True).read() as session:
            b = None
            if batch is not None:
                b = session.scalar(select(Batch).where(Batch.name == batch))
                if b is None:
                    raise UserError(f"--batch: no batch named {batch!r}")
            p = T.batch_progress(session, b)
        typer.echo(f"tasks {p['tasks']}  done {p['done']}  judgments {p['judgments']}")
        for name, n in p["annotators"].items():
            typer.echo(f"  {name}\t{n}")
