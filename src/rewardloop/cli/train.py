"""Mounts the ``train`` command group (see ``_train_group``)."""

from __future__ import annotations

import typer

from rewardloop.cli._train_group import train_app

ORDER = 40


def register(app: typer.Typer) -> None:
    app.add_typer(train_app, name="train")
