"""Publishes messages with Event-Forge's own Python publisher (`AioPikaPublisher`,
package `event-forge`), unchanged, with publisher confirms.

usage: python event_forge_publish.py AMQP_URL EXCHANGE ID...
Message i: aggregate Order/order-<i>, event order.placed, payload
{"orderId": ID, "n": i}, metadata with a W3C trace id and span id.
"""
import asyncio
import sys
from datetime import datetime, timezone

from event_forge.models import OutboxMessage, OutboxMessageStatus
from event_forge.publishers.aio_pika_publisher import AioPikaPublisher


async def main(url: str, exchange: str, ids: list[str]) -> None:
    publisher = AioPikaPublisher(url, exchange)
    await publisher.connect()
    now = datetime.now(timezone.utc)
    for i, message_id in enumerate(ids):
        await publisher.publish(
            OutboxMessage(
                id=message_id,
                aggregate_type="Order",
                aggregate_id=f"order-{i}",
                event_type="order.placed",
                payload={"orderId": message_id, "n": i},
                metadata={
                    "traceId": "4bf92f3577b34da6a3ce929d0e0e4736",
                    "spanId": "00f067aa0ba902b7",
                },
                status=OutboxMessageStatus.PENDING,
                created_at=now,
                updated_at=now,
            )
        )
    await publisher.disconnect()
    print(f"published {len(ids)}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
