"""Splitting batches of protobuf messages so that no carrier (a Kafka record, a stream
message) grows past a size."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from google.protobuf.message import Message

M = TypeVar("M", bound=Message)

# Internal streams batch tasks (payloads up to 1 MiB) and results (up to 1 MiB): a sender
# splits its batches at BATCH_BYTES, and one item always fits, so a message stays far below
# what every internal server and channel accepts (MAX_MESSAGE_BYTES).
BATCH_BYTES = 4 * 1024 * 1024
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def chunks_by_size(messages: Iterable[M], limit: int) -> list[list[M]]:
    """The messages in order, in chunks whose encoded size stays at or below ``limit`` — except
    a lone message larger than it, which gets a chunk of its own. Always at least one chunk."""
    chunks: list[list[M]] = [[]]
    size = 0
    for message in messages:
        # As a repeated field: 1 tag byte and at most 4 length bytes (messages < 256 MiB).
        grows = message.ByteSize() + 5
        if chunks[-1] and size + grows > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(message)
        size += grows
    return chunks
