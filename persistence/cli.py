"""Command-line tools: ``flask --app wsgi init-db``."""

from __future__ import annotations

import click
from flask import Flask, current_app
from flask.cli import with_appcontext

from persistence.config import describe
from persistence.store import StoreError


@click.command("init-db")
@with_appcontext
def init_db_command() -> None:
    """Create the database (MySQL, if the user may) and the tables, if they do not exist."""
    service = current_app.extensions["persistence"]
    try:
        service.store.create_schema(create_database=True)
    except StoreError as exc:
        raise click.ClickException(
            f"could not create the tables in {describe(service.settings)}: {exc}"
        ) from None
    finally:
        service.store.close()
    click.echo(f"Tables ready in {describe(service.settings)}.")


def init_app(app: Flask) -> None:
    app.cli.add_command(init_db_command)
