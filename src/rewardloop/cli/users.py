"""``rewardloop users add|list|deactivate|token``: the people who may log in."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from rewardloop.cli._common import DB, read_text_file, resolve_db

ORDER = 11


def _read_password(password_file: Path | None, token: bool) -> str | None:
    from rewardloop.errors import UserError

    if password_file is not None:
        lines = read_text_file(password_file, "--password-file").splitlines()
        if not lines or not lines[0]:
            raise UserError(f"--password-file: {password_file} is empty")
        return lines[0]
    if token:
        return None
    if not sys.stdin.isatty():
        raise UserError("give --password-file FILE or --token (no terminal to ask for a password)")
    first = typer.prompt("Password", hide_input=True)
    if typer.prompt("Repeat password", hide_input=True) != first:
        raise UserError("the two passwords differ")
    return first


def register(app: typer.Typer) -> None:
    users = typer.Typer(help="Manage annotators and admins (passwords, tokens).",
                        no_args_is_help=True)
    app.add_typer(users, name="users")

    @users.command("add")
    def add(
        name: str = typer.Argument(..., help="Login name (1-120 printable characters)."),
        role: str = typer.Option(..., "--role", help="admin or annotator."),
        group: list[str] = typer.Option(
            [], "--group", help="A group the person consented to record (repeatable); used only "
            "for fairness analysis. No , = or @ in a name (reward mixes name groups as "
            "RUN@group=w,group=w)."),
        password_file: Path | None = typer.Option(
            None, "--password-file", help="File whose first line is the password (8+ chars, "
            "not a common one, not containing the user name). Without it and without --token "
            "you are asked on the terminal."),
        token: bool = typer.Option(
            False, "--token", help="Also create a bearer token for scripts; it is printed once, "
            "alone on the last line."),
        db: str | None = DB,
    ) -> None:
        """Add a user who can log in with a password and/or a bearer token."""
        from rewardloop.app import accounts
        from rewardloop.data.store import Store

        password = _read_password(password_file, token)
        store = Store(resolve_db(db))
        with store.write() as session:
            user = accounts.add_user(session, name, role, password=password, groups=group)
            secret = accounts.new_token(session, user) if token else None
        typer.echo(f"added {role} {name}" + (" (password set)" if password else ""))
        if secret is not None:
            typer.echo("bearer token (shown once; keep it secret):")
            typer.echo(secret)

    @users.command("list")
    def list_(db: str | None = DB) -> None:
        """List users: name, role, active, groups."""
        from sqlalchemy import select

        from rewardloop.data.schema import Annotator
        from rewardloop.data.store import Store

        with Store(resolve_db(db), existing=True).read() as session:
            rows = session.scalars(select(Annotator).order_by(Annotator.name)).all()
            for u in rows:
                state = "active" if u.active else "inactive"
                typer.echo(f"{u.name}\t{u.role}\t{state}\t{','.join(u.groups or [])}")

    @users.command("deactivate")
    def deactivate(name: str = typer.Argument(..., help="Login name."),
                   db: str | None = DB) -> None:
        """Turn a user off: their sessions and tokens stop working at once."""
        from rewardloop.app import accounts
        from rewardloop.data.store import Store

        with Store(resolve_db(db), existing=True).write() as session:
            accounts.deactivate_user(session, name)
        typer.echo(f"deactivated {name}")

    @users.command("token")
    def token_(name: str = typer.Argument(..., help="Login name."),
               db: str | None = DB) -> None:
        """Issue a new bearer token (earlier tokens of this user are revoked); printed last."""
        from rewardloop.app import accounts
        from rewardloop.data.store import Store
        from rewardloop.errors import UserError

        with Store(resolve_db(db), existing=True).write() as session:
            user = accounts.get_user(session, name)
            if not user.active:
                raise UserError(f"{name} is deactivated")
            secret = accounts.new_token(session, user)
        typer.echo(f"new token for {name}; earlier tokens revoked (shown once):")
        typer.echo(secret)
