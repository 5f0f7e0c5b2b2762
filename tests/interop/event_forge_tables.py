"""Event-Forge's own tables, made by Event-Forge's own models (package `event-forge`,
SQLAlchemy `Base.metadata`): no server defaults, Event-Forge's index names.

usage: python event_forge_tables.py ddl
           prints the DDL the models emit for PostgreSQL (what
           tests/fixtures/event_forge_1_5_0.sql holds, verbatim)
       python event_forge_tables.py create POSTGRES_URL SCHEMA
           creates outbox_messages and inbox_messages in SCHEMA with
           Base.metadata.create_all (POSTGRES_URL: postgresql://user@host:port/db)
"""
import sys

from event_forge.repositories.sqlalchemy.entities import Base
from sqlalchemy import create_engine, create_mock_engine, text


def ddl() -> None:
    def dump(sql, *multiparams, **params):
        print(str(sql.compile(dialect=engine.dialect)).strip() + ";")

    engine = create_mock_engine("postgresql+psycopg2://", dump)
    Base.metadata.create_all(engine, checkfirst=False)


def create(url: str, schema: str) -> None:
    # asyncpg is what Event-Forge services use; create_all needs a sync driver, and
    # the DDL does not depend on it: psycopg2 when present, else pg8000.
    try:
        import psycopg2  # noqa: F401

        driver = "postgresql+psycopg2"
    except ImportError:
        driver = "postgresql+pg8000"
    engine = create_engine(url.replace("postgresql", driver, 1))
    with engine.begin() as conn:
        conn.execute(text(f'create schema if not exists "{schema}"'))
        conn.execute(text(f'set local search_path = "{schema}"'))
        Base.metadata.create_all(conn)
    engine.dispose()
    print(f"created outbox_messages and inbox_messages in {schema}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["ddl"]:
        ddl()
    elif sys.argv[1:2] == ["create"] and len(sys.argv) == 4:
        create(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
