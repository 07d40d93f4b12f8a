"""Every key one Redis Function touches lives in one Redis Cluster hash slot."""

from __future__ import annotations

from dataclasses import astuple

from redis.crc import key_slot

from engine.keys import ReleaseKeys, bucket
from engine.reservations import new_release


def test_release_keys_share_one_cluster_slot() -> None:
    for release_id in ("r0123456789ab", new_release("s", "p", "fcfs", []).id):
        slots = {key_slot(k.encode()) for k in astuple(ReleaseKeys.of(release_id))}
        assert len(slots) == 1


def test_buckets_spread_across_slots() -> None:
    slots = {key_slot(bucket("client", f"10.0.0.{i}").encode()) for i in range(50)}
    assert len(slots) > 40
