"""Processes the `received` rows of an inbox table with Event-Forge's own
InboxService (Python package `event-forge`, SQLAlchemy repository), unchanged.

usage: python event_forge_inbox.py POSTGRES_URL SCHEMA
The table is SCHEMA.inbox_messages (Event-Forge's entity names no schema: the
search path picks it). Prints the processed message ids, comma-separated.
"""
import asyncio
import sys

from event_forge import InboxService
from event_forge.repositories.sqlalchemy import SQLAlchemyInboxRepository
from event_forge.repositories.sqlalchemy.entities import InboxMessageEntity
from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine


async def main(url: str, schema: str) -> None:
    engine = create_async_engine(
        url, connect_args={"server_settings": {"search_path": schema}}
    )
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    repository = SQLAlchemyInboxRepository(sessions)
    inbox = InboxService(repository=repository)
    seen = []

    async def handle(message):
        assert message.payload["id"] == message.message_id, message
        seen.append(message.message_id)

    inbox.register_handler("order.placed", handle)
    async with sessions() as session:
        rows = (
            await session.execute(
                select(InboxMessageEntity).where(InboxMessageEntity.status == "received")
            )
        ).scalars().all()
        messages = [repository._to_model(row) for row in rows]
    for message in messages:
        await inbox.process_message(message)
    await engine.dispose()
    print(",".join(sorted(seen)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
