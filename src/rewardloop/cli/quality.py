"""``rewardloop quality``: agreement, annotator reliability, bias and spam flags, groups."""

from __future__ import annotations

import json
from typing import Any

import typer

from rewardloop.cli._common import DB, resolve_db
from rewardloop.errors import UserError

ORDER = 25


def register(app: typer.Typer) -> None:
    app.command("quality")(quality)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _rate(rate: float | None, p: float | None) -> str:
    if rate is None or p is None:
        return "-"
    return f"{rate:.2f} ({p:.0e})" if p < 0.01 else f"{rate:.2f} ({p:.2f})"


def _print_report(report: Any) -> None:
    from rich.table import Table

    from rewardloop.cli._common import table_console

    console = table_console()
    console.print(f"judgments: {report.judgments}  "
                  f"Krippendorff's alpha: {_fmt(report.krippendorff_alpha)}  "
                  f"Fleiss' kappa: {_fmt(report.fleiss_kappa)}")
    c = report.ceiling
    if c.value is not None:
        console.print(f"label ceiling: {_fmt(c.value)} (up to {_fmt(c.upper)}), from "
                      f"{c.judgments} judgments of {c.units} pairs with overlap: the accuracy "
                      "the best possible reward model could reach")
    table = Table(title="Annotators")
    table.add_column("annotator", no_wrap=True)
    for col in ("group", "n", "agree", "chance", "reliab.", "gold", "first wins (p)",
                "longer wins (p)", "flags"):
        table.add_column(col)
    for name, q in sorted(report.annotators.items()):
        table.add_row(
            name, ",".join(q.groups), str(q.judgments), _fmt(q.agreement),
            _fmt(q.chance_agreement), _fmt(q.reliability), _fmt(q.gold_accuracy),
            _rate(q.bias.position_rate, q.bias.position_p),
            _rate(q.bias.length_rate, q.bias.length_p), ", ".join(q.flags) or "-")
    console.print(table)
    by_group = report.groups.get("by_group", {})
    if len(by_group) > 1:
        console.print(_group_table(by_group, report.groups.get("agreement_matrix", {})))
    pairs = report.groups.get("pairs", {})
    if pairs:
        groups = Table(title="Groups")
        for col in ("groups", "shared units", "verdict agreement", "mean |win-rate diff|"):
            groups.add_column(col)
        for key, g in pairs.items():
            groups.add_row(key, str(g["units"]), _fmt(g["agreement"]),
                           _fmt(g["mean_abs_win_rate_diff"]))
        console.print(groups)


def _group_table(by_group: dict[str, Any], matrix: dict[str, Any]) -> Any:
    """Per group: size, alpha within it (95% CI), and verdict agreement with every group."""
    from rich.table import Table

    names = sorted(by_group)
    table = Table(title="Groups: agreement within (alpha) and between (share of agreeing "
                        "verdicts)")
    for col in ("group", "annotators", "judgments", "alpha (95% CI)", *names):
        table.add_column(col)
    for g in names:
        row = by_group[g]
        ci = row.get("alpha_ci")
        alpha = _fmt(row.get("alpha")) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
        cells = [_fmt((matrix.get(g, {}).get(h) or {}).get("agreement")) for h in names]
        table.add_row(g, str(row["annotators"]), str(row["judgments"]), alpha, *cells)
    return table


def quality(
    db: str | None = DB,
    batch: str | None = typer.Option(
        None, "--batch", help="Only judgments of tasks in this batch. Default: all judgments."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object (stable keys, see docs/quality.md)."
    ),
) -> None:
    """Agreement (Krippendorff's alpha, Fleiss' kappa), per-annotator reliability, bias and spam
    flags, and where annotator groups disagree."""
    from rewardloop.data.store import Store
    from rewardloop.feedback.quality import quality_report

    try:
        store = Store(resolve_db(db), existing=True)
        try:
            report = quality_report(store, batch)
        finally:
            store.dispose()
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        _print_report(report)
