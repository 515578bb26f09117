"""Command-line tools: ``flask --app wsgi init-db`` and ``flask --app wsgi dead-letters``."""

from __future__ import annotations

import click
from flask import Flask, current_app
from flask.cli import AppGroup, with_appcontext

from persistence import deadletters
from persistence.config import describe
from persistence.service import PersistenceService
from persistence.store import StoreError


def _service() -> PersistenceService:
    return current_app.extensions["persistence"]


@click.command("init-db")
@with_appcontext
def init_db_command() -> None:
    """Create the database (MySQL, if the user may) and the tables, if they do not exist."""
    service = _service()
    try:
        service.store.create_schema(create_database=True)
    except StoreError as exc:
        raise click.ClickException(
            f"could not create the tables in {describe(service.settings)}: {exc}"
        ) from None
    finally:
        service.store.close()
    click.echo(f"Tables ready in {describe(service.settings)}.")


dead_letters_group = AppGroup("dead-letters", help="List and replay dead letters.")


@dead_letters_group.command("list")
@click.option("--type", "record_type", type=click.Choice(["session", "task"]), default=None)
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
def list_command(record_type: str | None, limit: int) -> None:
    """Show dead letters, oldest first: id, type, key, attempts, last failure, error."""
    store = _service().store
    try:
        letters = store.fetch_dead_letters(record_type=record_type, limit=limit)
    except StoreError as exc:
        raise click.ClickException(f"could not read the dead letters: {exc}") from None
    finally:
        store.close()
    if not letters:
        click.echo("No dead letters.")
        return
    click.echo("id\ttype\tkey\tattempts\tlast_failed_at\terror")
    for row in letters:
        click.echo(
            f"{row['id']}\t{row['record_type']}\t{row['record_key']}\t{row['attempts']}\t"
            f"{row['last_failed_at']}\t{row['error_message']}"
        )


@dead_letters_group.command("replay")
@click.argument("ids", nargs=-1, type=int)
@click.option("--type", "record_type", type=click.Choice(["session", "task"]), default=None)
def replay_command(ids: tuple[int, ...], record_type: str | None) -> None:
    """Write dead letters back to their tables (all of them, or the given ids).

    A replayed dead letter is deleted; one that fails again stays with its error.
    Safe to run more than once.
    """
    store = _service().store
    try:
        report = deadletters.replay(store, ids=ids, record_type=record_type)
    except StoreError as exc:
        raise click.ClickException(f"replay stopped, the database failed: {exc}") from None
    finally:
        store.close()
    for label in report.replayed:
        click.echo(f"replayed {label}")
    for label in report.still_waiting:
        click.echo(f"kept {label}: its session is still not in the database")
    for label, error in report.failed:
        click.echo(f"kept {label}: {error}")
    click.echo(
        f"{len(report.replayed)} replayed, {len(report.still_waiting) + len(report.failed)} kept."
    )


def init_app(app: Flask) -> None:
    app.cli.add_command(init_db_command)
    app.cli.add_command(dead_letters_group)
