"""Identifiers for rows whose ids are strings (seed 000's VARCHAR primary keys).

UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then random bits. Ids sort by creation
time, which keeps B-tree inserts at the right edge of the index and makes ids readable as
an ordering hint. Python 3.11's uuid module has no uuid7, hence this function.
"""

import os
import time
import uuid


def uuid7() -> uuid.UUID:
    unix_ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    rand_a = rand >> 68  # 12 bits
    rand_b = rand & ((1 << 62) - 1)  # 62 bits
    value = (unix_ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= rand_a << 64
    value |= 0b10 << 62
    value |= rand_b
    return uuid.UUID(int=value)


def new_id() -> str:
    return str(uuid7())
