"""One meaning of task priority on both brokers: 0 is the least urgent, 9 the most urgent.

RabbitMQ (a queue with ``x-max-priority``) already serves higher numbers first. kombu's Redis
transport serves *lower* numbers first (it BRPOPs the priority lists in ascending step order) and
treats a missing priority as 0, the most urgent. So the application's number is mirrored for Redis
at publish time, and a message sent without a priority gets the middle default on both brokers
instead of jumping the queue on Redis.
"""

from __future__ import annotations

LEAST_URGENT = 0
MOST_URGENT = 9
DEFAULT_PRIORITY = 5


def validate(priority: object) -> int:
    """The priority as an int in 0..9, or a ValueError naming the field and the value."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"priority={priority!r}: expected a whole number from 0 to 9")
    if not LEAST_URGENT <= priority <= MOST_URGENT:
        raise ValueError(f"priority={priority!r}: expected a whole number from 0 to 9")
    return priority


def to_broker(priority: int | None, broker_is_redis: bool) -> int:
    """The number to put on the message for the application priority (None means default)."""
    value = DEFAULT_PRIORITY if priority is None else validate(priority)
    return MOST_URGENT - value if broker_is_redis else value


def from_broker(priority: int | None, broker_is_redis: bool) -> int | None:
    """The application priority of a delivered message (the inverse of ``to_broker``)."""
    if priority is None:
        return None
    return MOST_URGENT - priority if broker_is_redis else priority
