"""x-request-id values: UUIDv4s, never repeated, not shared with a forked worker."""

from __future__ import annotations

import os
import uuid

from meshproxy.observe.ids import new_request_id


def test_ids_are_version_4_uuids_and_unique_across_pool_refills() -> None:
    ids = [new_request_id() for _ in range(1000)]  # several 128-id refills
    assert len(set(ids)) == 1000
    for rid in ids:
        parsed = uuid.UUID(rid.decode())
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert str(parsed).encode() == rid  # canonical form: lowercase, dashed


def test_a_forked_child_draws_its_own_ids() -> None:
    new_request_id()  # the parent's pool holds ids the child must not repeat
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids and leave at once
        os.write(write, b"".join(new_request_id() for _ in range(4)))
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    child = os.read(read, 4096)
    os.close(read)
    assert status == 0 and len(child) == 4 * 36
    parent = b"".join(new_request_id() for _ in range(4))
    assert child != parent
