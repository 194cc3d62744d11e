"""The shared MessagePack packer: `msgpack.packb`'s bytes; a failed pack leaves nothing."""

from __future__ import annotations

import msgpack
import pytest

from herald.codec import packb


def test_packs_as_msgpack_packb_does() -> None:
    value = {"op": "message", "payload": {"n": [1, 2.5, None, True]}, "raw": b"\x00\xff"}
    assert packb(value) == msgpack.packb(value, use_bin_type=True)
    assert packb(value) == packb(value)  # nothing of the first call is left in the buffer


@pytest.mark.parametrize("bad", [object(), 2**70])
def test_a_failed_pack_does_not_leak_into_the_next(bad: object) -> None:
    # One packer serves the whole worker: half-written bytes of a failed message
    # would otherwise become the head of the next subscriber's frame.
    with pytest.raises((TypeError, OverflowError)):
        packb(["partly written", bad])
    assert packb(["next"]) == msgpack.packb(["next"], use_bin_type=True)
