"""Alembic environment for the queue DB.

The gateway runs migrations itself (``gateway.store.upgrade_schema``), passing its open connection in
``config.attributes["connection"]``. Run by hand, Alembic reads the URL from the gateway's own settings:
``DICOMGW_CONFIG=conf/gateway.toml alembic -c migrations/alembic.ini upgrade head``.
"""

from __future__ import annotations

import os

from alembic import context

from gateway.store import Base, make_engine

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from gateway.settings import load_settings

    return load_settings(os.environ.get("DICOMGW_CONFIG", "conf/gateway.toml")).queue.db_url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    try:
        with engine.begin() as conn:
            context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
