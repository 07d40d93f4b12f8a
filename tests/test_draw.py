"""Release by draw: the algorithm, its record and checker, and the draw run by the engine."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import http.server
import json
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from engine import cli, draw
from engine import store as store_module
from engine.app import create_app
from engine.appkeys import LOTTERY, RESERVATIONS
from engine.settings import Rate
from engine.sweeper import sweep_once
from tests.api import ADMIN, Api, Reply, applicant, ip
from tests.conftest import DATABASE_URL, REDIS_URL, FakeClock, make_settings
from tests.procs import TcpProxy, poll

PLACES = [
    draw.Places("s2", "2026-12-02T09:00:00Z", 1),
    draw.Places("s1", "2026-12-01T09:00:00Z", 2),
]
SEED = "ab" * 32


def digests(n: int) -> list[str]:
    return [draw.entry_digest(f"e{i}") for i in range(n)]


# The algorithm ---------------------------------------------------------------------------


def test_allocation_is_deterministic_and_respects_capacity() -> None:
    entries = digests(10)
    first = draw.allocate(SEED, entries, "", PLACES)
    assert first == draw.allocate(SEED, list(reversed(entries)), "", PLACES)
    assert Counter(first.values()) == {"s1": 2, "s2": 1}
    assert len(first) == len(set(first)) == 3  # nobody wins twice
    # Places go to the best-ranked entries, earliest slot first.
    ranked = draw.order(entries, draw.key(SEED, draw.entries_digest(entries), ""))
    assert first == {ranked[0]: "s1", ranked[1]: "s1", ranked[2]: "s2"}
    assert draw.allocate(SEED, entries, "beacon-42", PLACES) != first
    assert draw.allocate("cd" * 32, entries, "", PLACES) != first


def test_fewer_entries_than_places_and_excluded_entries() -> None:
    entries = digests(2)
    assert set(draw.allocate(SEED, entries, "", PLACES)) == set(entries)
    many = digests(10)
    excluded = many[:5]
    allocation = draw.allocate(SEED, many, "", PLACES, excluded)
    assert not set(allocation) & set(excluded) and len(allocation) == 3


def test_every_entry_has_the_same_chance() -> None:
    """Chi-square over 4000 fixed seeds: 6 entries, 2 places; deterministic, so not flaky."""
    entries = digests(6)
    places = [draw.Places("s", "2026-12-01T09:00:00Z", 2)]
    wins: Counter[str] = Counter()
    seeds = 4000
    for n in range(seeds):
        wins.update(list(draw.allocate(f"{n:064x}", entries, "", places)))
    expected = seeds * 2 / 6
    chi2 = sum((wins[e] - expected) ** 2 / expected for e in entries)
    assert chi2 < 20.52  # df = 5, p = 0.001
    assert sum(wins.values()) == seeds * 2


def make_record(
    beacon: str = "b", beacon_source: str | None = None, **changes: Any
) -> dict[str, Any]:
    """A record drawn with ``beacon`` (its source named or not), then ``changes`` made."""
    rec = draw.record(
        release="r1",
        seed_hex=SEED,
        beacon=beacon,
        digests=digests(8),
        places=PLACES,
        excluded=[],
        drawn_at="2026-11-30T10:00:00Z",
        beacon_source=beacon_source,
    )
    rec.update(changes)
    return rec


def test_verify_accepts_a_record_and_rejects_every_tampering() -> None:
    rec = make_record()
    assert draw.verify(rec) == []
    changed_seed = make_record(seed="cd" * 32)
    assert any("seed commitment" in p for p in draw.verify(changed_seed))
    swapped = copy.deepcopy(rec)
    winners = sorted(swapped["allocation"])
    loser = next(d for d in swapped["entries"] if d not in swapped["allocation"])
    swapped["allocation"][loser] = swapped["allocation"].pop(winners[0])
    assert draw.verify(swapped)
    removed = copy.deepcopy(rec)
    removed["entries"].remove(loser)
    assert any("entries digest" in p for p in draw.verify(removed))
    added = copy.deepcopy(rec)
    added["entries"].append(draw.entry_digest("intruder"))
    assert any("entries digest" in p for p in draw.verify(added))
    assert draw.verify({"nonsense": 1})
    # Recomputed as written, never coerced: each of these read as a record before (an
    # object's keys as its entries, a count of 2.9 as 2), or broke the command.
    for name, value in (
        ("entries", dict.fromkeys(rec["entries"], 1)),
        ("entries", 5),
        ("places", [{**rec["places"][0], "count": 2.9}]),
        ("places", [{**rec["places"][0], "count": True}]),
        ("allocation", list(rec["allocation"])),
        ("release", None),
        ("seed", 7),
    ):
        bad = {**copy.deepcopy(rec), name: value}
        assert draw.malformed(bad) is not None, name
        assert draw.verify(bad) == [f"the record is malformed: {draw.malformed(bad)}"], name
    without_release = copy.deepcopy(rec)
    del without_release["release"]
    assert "release" in str(draw.verify(without_release))


def test_verify_draw_checks_the_commitment_one_kept_and_finds_ones_entry(tmp_path: Any) -> None:
    """The record is checked against itself: whoever could change it could change its
    commitment too. A person who kept the commitment published when registration opened
    can give it, and their entry id, to learn their own outcome from the record."""
    rec = make_record()
    path = tmp_path / "record.json"
    path.write_text(json.dumps(rec))

    def verify(*options: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "engine", "verify-draw", str(path), *options]
        return subprocess.run(argv, capture_output=True, text=True, check=False)

    entry_ids = [f"e{i}" for i in range(8)]  # make_record's entries
    winner = next(e for e in entry_ids if draw.entry_digest(e) in rec["allocation"])
    loser = next(e for e in entry_ids if draw.entry_digest(e) not in rec["allocation"])
    kept = rec["seed_commitment"]
    won = verify("--commitment", kept, "--entry-id", winner)
    assert won.returncode == 0, won.stderr
    assert f"won a place on slot {rec['allocation'][draw.entry_digest(winner)]}" in won.stdout
    lost = verify("--entry-id", loser)
    assert lost.returncode == 0 and "was not drawn" in lost.stdout, lost
    absent = verify("--entry-id", "e-never-entered")
    assert absent.returncode == 1 and "is not in the entry list" in absent.stderr, absent
    other = verify("--commitment", "ab" * 32)
    assert other.returncode == 1 and "commitment you kept" in other.stderr, other
    # The entries digest kept after the close: a record republished on another list, its
    # digest computed anew, matches itself but not that.
    frozen = verify("--entries-digest", rec["entries_digest"].upper())
    assert frozen.returncode == 0 and "entries frozen at the close" in frozen.stdout, frozen
    relisted = verify("--entries-digest", "cd" * 32)
    assert (
        relisted.returncode == 1 and "entries digest is not the one you kept" in relisted.stderr
    ), relisted
    # A record that is not one: said so, never a traceback.
    for name, value in (("entries", 5), ("release", None)):
        path.write_text(json.dumps({**rec, name: value}))
        broken = verify("--entry-id", winner)
        assert broken.returncode == 1 and "malformed" in broken.stderr, broken
        assert "Traceback" not in broken.stderr, broken
    # A draw that used no beacon, though the release named its source, is said to.
    path.write_text(json.dumps(make_record(beacon="", beacon_source="Loto, 2026-12-02")))
    unbeaconed = verify()
    assert unbeaconed.returncode == 0 and "WARNING: the draw used no beacon" in unbeaconed.stdout


def test_verify_draw_command(tmp_path: Any) -> None:
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(make_record()))
    bad.write_text(json.dumps({**make_record(), "beacon": "other"}))
    ok = subprocess.run(
        [sys.executable, "-m", "engine", "verify-draw", str(good)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0 and "OK" in ok.stdout
    ko = subprocess.run(
        [sys.executable, "-m", "engine", "verify-draw", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ko.returncode == 1 and "does NOT match" in ko.stderr


class _Bad(http.server.BaseHTTPRequestHandler):
    """Records no one should wait for: a byte every tenth of a second for 5 s, of the body
    (``/slow``) or of the headers (``/slow-headers``); a body as fast as it is read, without
    end (``/big``); a body cut short of its length (``/cut``) or of its chunks
    (``/cut-chunked``)."""

    def do_GET(self) -> None:
        with contextlib.suppress(OSError):  # until the command gives up
            if self.path == "/slow-headers":
                self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
                self._dribble()
                return
            if self.path == "/cut-chunked":
                self.wfile.write(
                    b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{"a"\r\n'
                )
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            if self.path == "/cut":
                self.send_header("Content-Length", "100")
                self.end_headers()
                self.wfile.write(b'{"a": 1}')
            elif self.path == "/slow":
                self.end_headers()
                self._dribble()
            else:
                self.end_headers()
                while True:
                    self.wfile.write(b" " * 65536)

    def _dribble(self) -> None:
        for _ in range(50):
            self.wfile.write(b" ")
            self.wfile.flush()
            time.sleep(0.1)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_verify_draw_gives_up_on_a_record_that_does_not_come_whole(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """urllib's timeout is each read's: a server that sent its headers or its body a byte
    at a time held ``guichet verify-draw`` as long, and one that sent without end filled its
    memory; an answer cut short was a traceback and exit 1 (which says "does NOT match").
    Each is now exit 2 and says why: the fetch has a time in all (``--timeout``) and a
    size, and a record that cannot be read whole is not read."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Bad)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(cli, "RECORD_MAX_BYTES", 1 << 20)
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        for path, said in (
            ("/slow", "took more than 1 s"),
            ("/slow-headers", "took more than 1 s"),
            ("/big", "larger than 1 MiB"),
            ("/cut", "cut short"),
            ("/cut-chunked", "not a whole HTTP answer"),
        ):
            assert cli.main(["verify-draw", f"{base}{path}", "--timeout", "1"]) == 2, path
            assert said in capsys.readouterr().err, path
    finally:
        server.shutdown()
        server.server_close()


# The engine --------------------------------------------------------------------------------


async def entry_status(api: Api, release: str, entry: dict[str, str]) -> dict[str, Any]:
    r = await api.call(
        "GET",
        f"/v1/releases/{release}/entries/{entry['entry_id']}",
        headers={"Authorization": f"Bearer {entry['entry_token']}"},
    )
    assert r.status == 200, r.body
    return r.body  # type: ignore[no-any-return]


async def test_entries_and_windows(api: Api, clock: FakeClock) -> None:
    await api.site()
    release = (await api.publish_draw([2], opens_in_s=60))["id"]
    listed = (await api.call("GET", "/v1/releases")).body["releases"][0]
    assert listed["mode"] == "draw" and len(listed["seed_commitment"]) == 64
    # No challenge outside registration: solved, it paid for an entry refused all the same.
    early = await api.call(
        "POST", "/v1/challenges", {"release": release}, {"X-Forwarded-For": ip(1)}
    )
    assert early.status == 409 and early.body["type"] == "/problems/not-open"
    # In the site's time, as listed (it was in UTC).
    window = f"from {listed['registration_opens_at']} to {listed['registration_closes_at']}"
    assert window in early.body["detail"], (listed, early.body)
    # When registration opens: 60 s, rounded up (the times are kept to the microsecond).
    assert early.headers["Retry-After"] in ("60", "61"), early.headers
    clock.advance(61)
    person = applicant()
    entry = await api.enter(release, person, ip(1))
    assert entry.status == 201 and entry.body["status"] == "registered"
    again = await api.enter(release, {**person, "email": "other@example.org"}, ip(2))
    assert again.status == 409 and again.body["type"] == "/problems/identity-already-booked"
    assert (await entry_status(api, release, entry.body)) == {"status": "registered"}
    wrong = await api.call(
        "GET",
        f"/v1/releases/{release}/entries/{entry.body['entry_id']}",
        headers={"Authorization": "Bearer nope"},
    )
    assert wrong.status == 401
    fcfs = await api.publish([1])
    hold = await api.hold(fcfs["slots"][0]["id"], ip(3))
    assert hold.status == 201
    assert (
        await api.hold(listed_slot(await api.call("GET", f"/v1/releases/{release}/slots")), ip(4))
    ).status == 409  # no holds on a draw release
    booked = await api.confirm(hold.body, applicant(id_number="BOOKED123"), ip(3))
    assert booked.status == 201
    r = await api.enter(release, applicant(id_number="BOOKED123"), ip(5))
    assert r.status == 409 and r.body["type"] == "/problems/identity-already-booked"
    withdrawn = await api.enter(release, applicant(), ip(6))
    auth = {"Authorization": f"Bearer {withdrawn.body['entry_token']}"}
    path = f"/v1/releases/{release}/entries/{withdrawn.body['entry_id']}"
    assert (await api.call("DELETE", path, headers=auth)).status == 204
    assert (await entry_status(api, release, withdrawn.body))["status"] == "withdrawn"
    clock.advance(86400 - 61 - 30)
    paid = await api.solved(release, ip(7))  # 30 s before the close
    clock.advance(60)
    late = await api.call(
        "POST",
        f"/v1/releases/{release}/entries",
        {**paid, "applicant": applicant()},
        {"X-Forwarded-For": ip(7)},
    )
    assert late.status == 409 and late.body["type"] == "/problems/not-open"
    closed = await api.call(
        "POST", "/v1/challenges", {"release": release}, {"X-Forwarded-For": ip(7)}
    )
    assert closed.status == 409 and closed.body["type"] == "/problems/not-open", closed.body
    assert window in closed.body["detail"] and "Retry-After" not in closed.headers
    undrawn = await api.call("GET", f"/v1/releases/{release}/draw")
    assert undrawn.status == 409 and listed["draw_at"] in undrawn.body["detail"], undrawn.body
    # An entry for a release that does not exist: 404, not 403 for the challenge (which
    # can only have been made for another release).
    body = {**paid, "applicant": applicant()}
    nowhere = await api.call(
        "POST", f"/v1/releases/r{'0' * 12}/entries", body, {"X-Forwarded-For": ip(8)}
    )
    assert nowhere.status == 404 and nowhere.body["type"] == "/problems/not-found", nowhere.body


def listed_slot(reply: Any) -> str:
    return str(reply.body["slots"][0]["id"])


async def run_draw_flow(
    api: Api, clock: FakeClock, entrants: int, capacities: list[int]
) -> tuple[str, list[dict[str, str]], dict[str, str]]:
    release = (await api.publish_draw(capacities))["id"]
    entries = []
    for i in range(entrants):
        r = await api.enter(release, applicant(), ip(100 + i))
        assert r.status == 201, r.body
        entries.append(r.body)
    withdrawn = entries.pop()
    await api.call(
        "DELETE",
        f"/v1/releases/{release}/entries/{withdrawn['entry_id']}",
        headers={"Authorization": f"Bearer {withdrawn['entry_token']}"},
    )
    clock.advance(90001)
    return release, entries, withdrawn


async def test_a_retried_entry_gets_the_entry_it_registered(
    api: Api, clock: FakeClock, pg: asyncpg.Connection
) -> None:
    """A phone sends its entry, the entry is registered, and the answer never arrives: the
    same request sent again gets the same entry (201), not 410 for the spent challenge and
    then 409 for the person registered, with the entry's token lost for good."""
    await api.site()
    release = (await api.publish_draw([2]))["id"]
    paid = await api.solved(release, ip(1))
    body = {**paid, "applicant": applicant()}
    path = f"/v1/releases/{release}/entries"
    first = await api.call("POST", path, body, {"X-Forwarded-For": ip(1)})
    assert first.status == 201
    again = await api.call("POST", path, body, {"X-Forwarded-For": ip(1)})
    assert (again.status, again.body) == (201, first.body)
    # Only that request: another client, or another person, with the same challenge is
    # refused as before.
    other = await api.call("POST", path, body, {"X-Forwarded-For": ip(2)})
    assert other.status == 403
    someone = {**paid, "applicant": applicant(id_number="OTHER1234")}
    refused = await api.call("POST", path, someone, {"X-Forwarded-For": ip(1)})
    assert refused.status == 410
    # A withdrawn entry is not registered again by its request.
    auth = {"Authorization": f"Bearer {first.body['entry_token']}"}
    entry = f"{path}/{first.body['entry_id']}"
    assert (await api.call("DELETE", entry, headers=auth)).status == 204
    assert (await api.call("POST", path, body, {"X-Forwarded-For": ip(1)})).status == 410
    assert await pg.fetchval("SELECT count(*) FROM entries WHERE release_id = $1", release) == 1
    # The same retry once the challenge's time, then registration, is over: the entry
    # still comes back; a request that registered nothing is refused as before.
    paid = await api.solved(release, ip(3))
    body = {**paid, "applicant": applicant()}
    first = await api.call("POST", path, body, {"X-Forwarded-For": ip(3)})
    assert first.status == 201
    clock.advance(301)
    late = await api.call("POST", path, body, {"X-Forwarded-For": ip(3)})
    assert (late.status, late.body) == (201, first.body)
    unused = await api.solved(release, ip(4))
    clock.advance(301)
    stale = {**unused, "applicant": applicant()}
    assert (await api.call("POST", path, stale, {"X-Forwarded-For": ip(4)})).status == 410
    clock.advance(86400)  # registration closed
    closed = await api.call("POST", path, body, {"X-Forwarded-For": ip(3)})
    assert (closed.status, closed.body) == (201, first.body)
    clock.advance(90001)  # drawn: the retry gets the entry as it is now
    domain, lottery = api.client.app[RESERVATIONS], api.client.app[LOTTERY]
    assert (await sweep_once(domain, reconcile=False, lottery=lottery)).draws == 1
    drawn = await api.call("POST", path, body, {"X-Forwarded-For": ip(3)})
    assert drawn.status == 201 and drawn.body == {**first.body, "status": "won"}


async def test_an_entry_whose_commit_was_not_acknowledged_is_found_again(
    api: Api, clock: FakeClock, pg: asyncpg.Connection
) -> None:
    """PostgreSQL commits the entry, and its acknowledgement is lost (here, held back by a
    proxy): the engine answers 503 and gives the challenge back. The retry finds the entry
    its first try registered and answers it, instead of 409 identity-already-booked."""
    await api.site()
    release = (await api.publish_draw([2]))["id"]
    proxy, dsn = await TcpProxy.started(DATABASE_URL)
    app = create_app(make_settings(database_url=dsn, pg_timeout_s=0.5), clock=clock, sweep=False)
    try:
        async with TestClient(TestServer(app)) as client:
            phone = Api(client, clock)
            paid = await phone.solved(release, ip(1))
            body = {**paid, "applicant": applicant()}
            path = f"/v1/releases/{release}/entries"
            proxy.hold_back(b"COMMIT", replies=True)
            lost = await phone.call("POST", path, body, {"X-Forwarded-For": ip(1)})
            assert lost.status == 503, lost.body
            assert len(proxy.held) == 1
            proxy.hold_back()
            retry = await phone.call("POST", path, body, {"X-Forwarded-For": ip(1)})
            assert retry.status == 201, retry.body
    finally:
        await proxy.stop()
    auth = {"Authorization": f"Bearer {retry.body['entry_token']}"}
    view = await api.call("GET", f"{path}/{retry.body['entry_id']}", headers=auth)
    assert view.status == 200 and view.body["status"] == "registered"
    assert await pg.fetchval("SELECT count(*) FROM entries WHERE release_id = $1", release) == 1


async def spent_meanwhile_then_given_back(
    proxy: TcpProxy,
    first: Api,
    other: Api,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
) -> None:
    """``first`` (its PostgreSQL through ``proxy``) tries to enter and waits on its insert;
    meanwhile ``other`` is told the challenge is spent (410), and remembers it; then the
    first try's connection breaks: 503, and the challenge is given back."""
    proxy.hold_back(b"INSERT INTO entries")  # the first try's insert never arrives
    trying = asyncio.create_task(first.call("POST", path, body, headers))

    async def held() -> bool:
        return bool(proxy.held)

    await poll(held, lambda: "the insert was never sent")
    meanwhile = await other.call("POST", path, body, headers)
    assert meanwhile.status == 410, meanwhile.body
    await proxy.stop()
    assert (await trying).status == 503


async def test_an_entry_given_back_its_challenge_is_not_remembered_as_spent(
    api: Api, clock: FakeClock, pg: asyncpg.Connection
) -> None:
    """A retry sent while the first try still waits on PostgreSQL is told the challenge is
    spent (410), and the worker it reached remembers it so. The first try, on another worker,
    then fails (503) and gives the challenge back: a later retry reaching either worker must
    be able to spend it, not be refused from a memory that Redis no longer agrees with."""
    await api.site()
    release = (await api.publish_draw([2]))["id"]
    proxy, dsn = await TcpProxy.started(DATABASE_URL)
    first_worker = create_app(make_settings(database_url=dsn), clock=clock, sweep=False)
    try:
        async with TestClient(TestServer(first_worker)) as client:
            first = Api(client, clock)
            paid = await first.solved(release, ip(1))
            body = {**paid, "applicant": applicant()}
            path = f"/v1/releases/{release}/entries"
            headers = {"X-Forwarded-For": ip(1)}
            await spent_meanwhile_then_given_back(proxy, first, api, path, body, headers)
    finally:
        await proxy.stop()
    retry = await api.call("POST", path, body, headers)
    assert retry.status == 201, retry.body
    assert await pg.fetchval("SELECT count(*) FROM entries WHERE release_id = $1", release) == 1


async def test_an_entry_spent_again_after_a_give_back_takes_the_global_entry_bucket(
    api: Api, clock: FakeClock, pg: asyncpg.Connection
) -> None:
    """The retry that spends a given-back challenge again, on a worker that remembered it
    spent, is a new attempt: it takes the global entry bucket, which sheds entries under
    load, and if that refuses it, gives the challenge back."""
    await api.site()
    release = (await api.publish_draw([2]))["id"]
    proxy, dsn = await TcpProxy.started(DATABASE_URL)
    two_an_hour = Rate(2, 3600)  # the first try's, and another person's entry
    first_worker = create_app(
        make_settings(database_url=dsn, limit_global_confirm=two_an_hour),
        clock=clock,
        bucket_clock=clock,
        sweep=False,
    )
    other_worker = create_app(
        make_settings(limit_global_confirm=two_an_hour),
        clock=clock,
        bucket_clock=clock,
        sweep=False,
    )
    path = f"/v1/releases/{release}/entries"
    headers = {"X-Forwarded-For": ip(1)}
    try:
        async with (
            TestClient(TestServer(first_worker)) as first_client,
            TestClient(TestServer(other_worker)) as other_client,
        ):
            first, other = Api(first_client, clock), Api(other_client, clock)
            paid = await first.solved(release, ip(1))
            body = {**paid, "applicant": applicant()}
            await spent_meanwhile_then_given_back(proxy, first, other, path, body, headers)
            # The retry told "spent" gave its token back: another person's entry takes it.
            assert (await other.enter(release, applicant(), ip(2))).status == 201
            shed = await other.call("POST", path, body, headers)
            assert (shed.status, shed.body["level"]) == (503, "global"), shed.body
    finally:
        await proxy.stop()
    # The challenge was given back: a worker whose bucket has room registers the entry.
    clock.advance(1)
    retry = await api.call("POST", path, body, headers)
    assert retry.status == 201, retry.body
    assert await pg.fetchval("SELECT count(*) FROM entries WHERE release_id = $1", release) == 2


async def test_an_entry_whose_spend_answer_was_lost_gives_its_challenge_back(
    api: Api, clock: FakeClock, pg: asyncpg.Connection
) -> None:
    """Redis spends the entry's challenge and its answer is lost (here, held back by a proxy):
    the engine answers 503, having registered nothing, and gives the challenge back, so
    that the retry registers the entry instead of being told "spent" for ever."""
    await api.site()
    release = (await api.publish_draw([2]))["id"]
    proxy, redis_url = await TcpProxy.started(REDIS_URL)
    app = create_app(
        make_settings(redis_url=redis_url, redis_timeout_s=0.5),
        clock=clock,
        sweep=False,
    )
    try:
        async with TestClient(TestServer(app)) as client:
            phone = Api(client, clock)
            paid = await phone.solved(release, ip(1))
            body = {**paid, "applicant": applicant()}
            path = f"/v1/releases/{release}/entries"
            headers = {"X-Forwarded-For": ip(1)}
            proxy.hold_back(b"*1\r\n$2\r\nok\r\n", replies=True)  # spend_challenge's "ok"
            lost = await phone.call("POST", path, body, headers)
            assert lost.status == 503, lost.body
            [spent] = proxy.held  # the spend's answer (and its unspent-list cleanup's)
            assert spent.startswith(b"*1\r\n$2\r\nok\r\n")
            proxy.hold_back()
            retry = await phone.call("POST", path, body, headers)
            assert retry.status == 201, retry.body
    finally:
        await proxy.stop()
    assert await pg.fetchval("SELECT count(*) FROM entries WHERE release_id = $1", release) == 1


async def test_the_draw_books_the_winners(
    api: Api, clock: FakeClock, pg: asyncpg.Connection, tmp_path: Any
) -> None:
    await api.site()
    release, entries, withdrawn = await run_draw_flow(api, clock, 9, [2, 1])
    domain = api.client.app[RESERVATIONS]
    report = await sweep_once(domain, reconcile=True, lottery=api.client.app[LOTTERY])
    assert report.draws == 1
    statuses = [await entry_status(api, release, e) for e in entries]
    assert Counter(s["status"] for s in statuses) == {"won": 3, "not-drawn": 5}
    assert (await entry_status(api, release, withdrawn))["status"] == "withdrawn"
    for s in statuses:
        if s["status"] == "won":
            ref = s["booking"]["reference"]
            read = await api.call(
                "GET",
                f"/v1/bookings/{ref}",
                headers={"Authorization": f"Bearer {s['cancel_token']}"},
            )
            assert read.status == 200 and read.body["booking"]["status"] == "confirmed"
    rec = (await api.call("GET", f"/v1/releases/{release}/draw")).body
    assert draw.verify(rec) == []
    assert draw.entry_digest(withdrawn["entry_id"]) not in rec["entries"]
    mine = {
        draw.entry_digest(e["entry_id"])
        for e, s in zip(entries, statuses, strict=True)
        if s["status"] == "won"
    }
    assert set(rec["allocation"]) == mine
    listed = (await api.call("GET", "/v1/releases")).body["releases"]
    assert [r["seed_commitment"] for r in listed if r["id"] == release] == [rec["seed_commitment"]]
    assert await pg.fetchval("SELECT sum(booked) FROM slots WHERE release_id = $1", release) == 3
    assert (await sweep_once(domain, reconcile=True, lottery=api.client.app[LOTTERY])).draws == 0
    counts = await domain.inventory.counts(release, domain.now_ms())
    assert sum(c.booked for c in counts.values()) == 3
    url = str(api.client.make_url(f"/v1/releases/{release}/draw"))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engine",
        "verify-draw",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()


async def test_the_draw_holds_its_winners_to_the_booking_caps(
    api: Api, clock: FakeClock, pg: asyncpg.Connection
) -> None:
    """docs/abuse.md's caps hold for a draw's winners as for a confirm online: an email
    address has at most 4 active bookings (here one address enters six people, and already
    has a booking: its three best-ranked entries win), and a person at the period's cap of
    cancellations wins nothing. Places are left for all of them: only the caps refuse."""
    await api.site()
    counter = (await api.publish([1, 1, 1]))["slots"]
    broker = "broker@example.org"
    await api.book(counter[0]["id"], applicant(email=broker), ip(1))
    cancels = applicant(id_number="CANCELS22")
    for slot in counter[1:]:
        booked = await api.book(slot["id"], cancels, ip(2))
        auth = {"Authorization": f"Bearer {booked['cancel_token']}"}
        ref = booked["booking"]["reference"]
        assert (await api.call("DELETE", f"/v1/bookings/{ref}", headers=auth)).status == 204
    release = (await api.publish_draw([10]))["id"]
    crowd = [(await api.enter(release, applicant(email=broker), ip(10 + i))).body for i in range(6)]
    capped = (await api.enter(release, cancels, ip(20))).body
    others = [(await api.enter(release, applicant(), ip(30 + i))).body for i in range(2)]
    clock.advance(90001)
    domain = api.client.app[RESERVATIONS]
    assert (await sweep_once(domain, reconcile=False, lottery=api.client.app[LOTTERY])).draws == 1
    crowd_status = Counter(
        (s["status"], s.get("excluded", False))
        for s in [await entry_status(api, release, e) for e in crowd]
    )
    assert crowd_status == {("won", False): 3, ("withdrawn", True): 3}
    assert await entry_status(api, release, capped) == {"status": "withdrawn", "excluded": True}
    assert [(await entry_status(api, release, e))["status"] for e in others] == ["won", "won"]
    active = await pg.fetchval(
        """SELECT count(*) FROM bookings WHERE email_hash =
               (SELECT email_hash FROM entries WHERE id = $1) AND status = 'confirmed'""",
        crowd[0]["entry_id"],
    )
    assert active == 4
    rec = (await api.call("GET", f"/v1/releases/{release}/draw")).body
    assert draw.verify(rec) == [] and len(rec["excluded"]) == 4


async def test_the_draw_does_not_count_what_the_prefecture_called_off(
    api: Api, clock: FakeClock
) -> None:
    """A person whose three appointments the prefecture called off (`?by=prefecture`) is
    at neither cap for the draw, as for a confirm online: they win."""
    await api.site()
    slot = (await api.publish([1]))["slots"][0]["id"]
    person = applicant()
    for _ in range(3):
        booked = await api.call(
            "POST", "/v1/admin/bookings", {"slot_id": slot, "applicant": person}, ADMIN
        )
        path = f"/v1/admin/bookings/{booked.body['booking']['reference']}?by=prefecture"
        assert (await api.call("DELETE", path, headers=ADMIN)).status == 204
    release = (await api.publish_draw([1]))["id"]
    entry = (await api.enter(release, person, ip(10))).body
    clock.advance(90001)
    lottery = api.client.app[LOTTERY]
    assert (await sweep_once(api.client.app[RESERVATIONS], reconcile=False, lottery=lottery)).draws
    assert (await entry_status(api, release, entry))["status"] == "won"


async def broker_entering_a_draw(
    api: Api, clock: FakeClock
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str, dict[str, Any]]:
    """An address with three active bookings online, on three of four slots, whose next
    person enters a draw of five places, registration now closed: that entry's win would
    be the address's fourth active booking, its cap. (Slots, bookings, draw, entry.)"""
    await api.site()
    online = (await api.publish([1, 1, 1, 1]))["slots"]
    broker = "broker@example.org"
    booked = [
        await api.book(s["id"], applicant(email=broker), ip(1 + i))
        for i, s in enumerate(online[:3])
    ]
    release = (await api.publish_draw([5]))["id"]
    entry = (await api.enter(release, applicant(email=broker), ip(10))).body
    clock.advance(90001)
    return online, booked, release, entry


async def raced_then_excluded(
    api: Api, pg: asyncpg.Connection, drawing: Any, release: str, entry: dict[str, Any]
) -> None:
    """The draw rolled back for a booking that raced it; the next sweep counts that booking
    and passes the entry over, and the address stays at its cap."""
    assert (await drawing).draws == 0  # raced: rolled back
    lottery = api.client.app[LOTTERY]
    assert (await sweep_once(api.client.app[RESERVATIONS], reconcile=False, lottery=lottery)).draws
    assert await entry_status(api, release, entry) == {"status": "withdrawn", "excluded": True}
    active = await pg.fetchval(
        "SELECT count(*) FROM bookings WHERE email_hash = (SELECT email_hash FROM entries"
        " WHERE id = $1) AND status = 'confirmed'",
        entry["entry_id"],
    )
    assert active == 4


async def test_a_booking_that_races_the_draw_is_counted_against_its_caps(
    api: Api, clock: FakeClock, pg: asyncpg.Connection
) -> None:
    """The draw counts an address's bookings without book_hold's locks. One committed while
    the draw runs (here: held back until the draw, its exclusions counted, waits to write)
    would take the address over its cap with the draw's winner: the draw sees it after
    booking its winners, rolls back, and the next sweep excludes that winner."""
    online, booked, release, entry = await broker_entering_a_draw(api, clock)
    # The racing booking: the address's fourth, inserted and kept uncommitted while this
    # transaction holds the bookings table against writers.
    race = await asyncpg.connect(DATABASE_URL)
    tx = race.transaction()
    await tx.start()
    await race.execute(
        """INSERT INTO bookings (reference, slot_id, release_id, procedure_id, channel,
               hold_id, identity_hash, email_hash, family_name, given_names, cancel_token_hash)
           SELECT 'RC-RACE-0001', $2, release_id, procedure_id, 'online', 'race-hold',
                  '\\x01'::bytea, email_hash, family_name, given_names, cancel_token_hash
           FROM bookings WHERE reference = $1""",
        booked[0]["booking"]["reference"],
        online[3]["id"],
    )
    await race.execute("LOCK TABLE bookings IN SHARE MODE")
    domain, lottery = api.client.app[RESERVATIONS], api.client.app[LOTTERY]
    drawing = asyncio.create_task(sweep_once(domain, reconcile=False, lottery=lottery))
    waiting = """SELECT count(*) FROM pg_locks WHERE locktype = 'relation' AND NOT granted
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"""
    while await pg.fetchval(waiting) == 0:
        assert not drawing.done()
        await asyncio.sleep(0.01)
    await tx.commit()
    await race.close()
    await raced_then_excluded(api, pg, drawing, release, entry)


async def test_a_confirm_in_flight_when_the_draw_counts_again_is_counted(
    api: Api, clock: FakeClock, pg: asyncpg.Connection
) -> None:
    """A confirm that counted its caps before the draw's winners were booked, and commits
    after the draw counted them again, would be seen by neither count: here the address's
    fourth booking is in flight (book_hold called, not committed) when the draw, whose
    winner is the address's fifth, counts again. The draw waits for it, sees it, and rolls
    back; the next sweep passes the entry over."""
    online, booked, release, entry = await broker_entering_a_draw(api, clock)
    confirm = await asyncpg.connect(DATABASE_URL)
    try:
        tx = confirm.transaction()
        await tx.start()
        outcome = await confirm.fetchval(
            """SELECT k.outcome FROM bookings b, LATERAL book_hold('RC-LATE-0001', $2,
                   b.release_id, b.procedure_id, 'online', 'late-hold', '\\x00', '\\x02',
                   b.email_hash, 'F', 'G', '1990-01-01', '\\x00', '10.0.0.0/24', '30 days',
                   3, 2, 4) k
               WHERE b.reference = $1""",
            booked[0]["booking"]["reference"],
            online[3]["id"],
        )
        assert outcome == "booked"
        domain, lottery = api.client.app[RESERVATIONS], api.client.app[LOTTERY]
        drawing = asyncio.create_task(sweep_once(domain, reconcile=False, lottery=lottery))
        waits = """SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND
                   database = (SELECT oid FROM pg_database WHERE datname = current_database())"""
        while await pg.fetchval(waits) == 0:
            assert not drawing.done(), "the draw did not wait for the confirm in flight"
            await asyncio.sleep(0.01)
        await tx.commit()
    finally:
        await confirm.close()
    await raced_then_excluded(api, pg, drawing, release, entry)


async def test_a_winner_confirming_online_during_the_draw_makes_it_give_way(
    api: Api, clock: FakeClock, pg: asyncpg.Connection
) -> None:
    """A person whose entry wins confirms the same procedure online while the draw runs:
    the confirm, which holds the booking caps' lock shared, waits on the draw's winner row,
    and the draw then wants that lock alone. Rather than wait for PostgreSQL to break the
    deadlock (a second, every confirm queued behind it, then one of them aborted), the draw
    gives way at once: it rolls back, the confirm books, and the next sweep excludes the
    entry."""
    await api.site()
    online = (await api.publish([1]))["slots"][0]["id"]
    release = (await api.publish_draw([5]))["id"]
    entry = (await api.enter(release, applicant(), ip(10))).body
    identity = await pg.fetchval(
        "SELECT identity_hash FROM entries WHERE id = $1", entry["entry_id"]
    )
    clock.advance(90001)
    hold_back = await asyncpg.connect(DATABASE_URL)
    confirm = await asyncpg.connect(DATABASE_URL)
    waits = """SELECT count(*) FROM pg_locks WHERE locktype = $1 AND NOT granted AND
               database IS NOT DISTINCT FROM (SELECT oid FROM pg_database
                                              WHERE datname = current_database())"""
    try:
        tx = hold_back.transaction()
        await tx.start()
        await hold_back.execute("LOCK TABLE draws IN SHARE MODE")  # the draw waits, booked
        domain, lottery = api.client.app[RESERVATIONS], api.client.app[LOTTERY]
        drawing = asyncio.create_task(sweep_once(domain, reconcile=False, lottery=lottery))
        while await pg.fetchval(waits, "relation") == 0:
            assert not drawing.done()
            await asyncio.sleep(0.01)
        late = asyncio.create_task(
            confirm.fetchval(
                """SELECT outcome FROM book_hold('RC-WINR-0001', $1, $2, 'renouvellement',
                       'online', 'winner-hold', '\\x00', $3, '\\x03', 'F', 'G', '1990-01-01',
                       '\\x00', '10.0.0.0/24', '30 days', 3, 2, 4)""",
                online,
                online.rsplit(".", 1)[0],
                identity,
            )
        )
        waiting = "SELECT count(*) FROM pg_locks WHERE pid = $1 AND NOT granted"
        while await pg.fetchval(waiting, confirm.get_server_pid()) == 0:
            assert not late.done(), "the confirm did not wait on the draw's winner"
            await asyncio.sleep(0.01)

        def raced() -> float | None:
            return domain.metrics.registry.get_sample_value("guichet_draws_raced_total")

        before = raced() or 0
        await tx.commit()
        assert (await drawing).draws == 0  # gave way, not failed
        assert raced() == before + 1
        assert await late == "booked"
    finally:
        await hold_back.close()
        await confirm.close()
    assert (await sweep_once(domain, reconcile=False, lottery=lottery)).draws == 1
    assert await entry_status(api, release, entry) == {"status": "withdrawn", "excluded": True}


async def test_a_winner_who_books_after_the_draw_read_the_entries_makes_it_give_way(
    api: Api, clock: FakeClock, pg: asyncpg.Connection
) -> None:
    """A person whose entry wins books the procedure online after the draw read the
    entries (the draw waits meanwhile for its slots' rows) and commits first: the draw's
    booking of them breaks the one-active-booking index. That was counted as a failing
    draw (the alert's count) and logged as an exception. It gives way now, as for a cap
    gone over, and the next sweep passes the entry over."""
    await api.site()
    online = (await api.publish([1]))["slots"][0]["id"]
    release = (await api.publish_draw([1]))["id"]
    winner = applicant()
    entry = (await api.enter(release, winner, ip(10))).body
    clock.advance(90001)
    lottery, registry = api.client.app[LOTTERY], api.client.app[RESERVATIONS].metrics.registry
    hold_back = await asyncpg.connect(DATABASE_URL)
    try:
        tx = hold_back.transaction()
        await tx.start()
        await hold_back.execute("SELECT 1 FROM slots WHERE release_id = $1 FOR UPDATE", release)
        drawing = asyncio.create_task(lottery.run_due())
        waits = "SELECT count(*) FROM pg_locks WHERE locktype = 'transactionid' AND NOT granted"
        await poll(lambda: pg.fetchval(waits), lambda: "the draw never waited for its slots")
        await api.book(online, winner, ip(11))
        await tx.rollback()
        assert await drawing == []
    finally:
        await hold_back.close()
    assert registry.get_sample_value("guichet_draws_raced_total") == 1
    assert not registry.get_sample_value("guichet_draw_failures_total", {"step": "draw"})
    assert [done.release_id for done in await lottery.run_due()] == [release]
    assert await entry_status(api, release, entry) == {"status": "withdrawn", "excluded": True}


async def test_an_entry_excluded_by_the_draw_says_so(api: Api, clock: FakeClock) -> None:
    """A person who entered, then booked the procedure at the counter before the draw, is
    excluded by it: their entry reads ``withdrawn`` (API.md's statuses) with
    ``"excluded": true``, so they can tell it from a withdrawal they never made. An entry
    withdrawn by its person has no such field."""
    await api.site()
    counter_slot = (await api.publish([1]))["slots"][0]["id"]
    booked_otherwise = applicant(987_654)
    release = (await api.publish_draw([3]))["id"]
    entered = await api.enter(release, booked_otherwise, ip(50))
    assert entered.status == 201, entered.body
    staff = {"slot_id": counter_slot, "applicant": booked_otherwise}
    assert (await api.call("POST", "/v1/admin/bookings", staff, ADMIN)).status == 201
    entries = [(await api.enter(release, applicant(), ip(60 + i))).body for i in range(3)]
    withdrawn = (await api.enter(release, applicant(), ip(70))).body
    path = f"/v1/releases/{release}/entries/{withdrawn['entry_id']}"
    auth = {"Authorization": f"Bearer {withdrawn['entry_token']}"}
    assert (await api.call("DELETE", path, headers=auth)).status == 204
    clock.advance(90001)
    domain = api.client.app[RESERVATIONS]
    assert (await sweep_once(domain, reconcile=False, lottery=api.client.app[LOTTERY])).draws == 1
    rec = (await api.call("GET", f"/v1/releases/{release}/draw")).body
    assert rec["excluded"] == [draw.entry_digest(entered.body["entry_id"])]
    assert await entry_status(api, release, entered.body) == {
        "status": "withdrawn",
        "excluded": True,
    }
    assert await entry_status(api, release, withdrawn) == {"status": "withdrawn"}
    assert {(await entry_status(api, release, e))["status"] for e in entries} == {"won"}


async def test_an_entry_is_withdrawn_until_the_draw_and_passed_over_once_frozen(
    api: Api, clock: FakeClock
) -> None:
    """API.md: withdraw "before the draw". Withdrawn after registration closed, the entry
    stays in the frozen list (the record's entries, which a checker hashes) and the draw
    passes it over, with places to spare. After the draw: 409 not-open, for a winner or
    an entry the draw passed over alike."""
    await api.site()
    release = (await api.publish_draw([3]))["id"]
    early, late, winner = [
        (await api.enter(release, applicant(), ip(80 + i))).body for i in range(3)
    ]

    async def withdraw(entry: dict[str, str]) -> Reply:
        path = f"/v1/releases/{release}/entries/{entry['entry_id']}"
        auth = {"Authorization": f"Bearer {entry['entry_token']}"}
        return await api.call("DELETE", path, headers=auth)

    assert (await withdraw(early)).status == 204  # registration open: out of the list
    clock.advance(86400)  # registration closed, the draw not yet run
    lottery = api.client.app[LOTTERY]
    await lottery.run_due()  # freezes the list; nothing due yet
    assert (await withdraw(late)).status == 204
    assert (await withdraw(late)).status == 204  # again: as asked
    assert await entry_status(api, release, late) == {"status": "withdrawn"}
    clock.advance(3601)
    [outcome] = await lottery.run_due()
    assert (outcome.entries, outcome.places, outcome.allocated) == (2, 3, 1)
    rec = (await api.call("GET", f"/v1/releases/{release}/draw")).body
    assert draw.verify(rec) == []
    assert sorted(rec["entries"]) == sorted(
        draw.entry_digest(e["entry_id"]) for e in (late, winner)
    )
    assert rec["excluded"] == [draw.entry_digest(late["entry_id"])]
    assert await entry_status(api, release, late) == {"status": "withdrawn"}
    assert (await entry_status(api, release, winner))["status"] == "won"
    refused = await withdraw(winner)
    assert (refused.status, refused.body["type"]) == (409, "/problems/not-open")
    assert (await withdraw(early)).status == 204  # withdrawn before: as asked


async def test_a_withdrawal_does_not_wait_for_a_running_draw(
    api: Api, clock: FakeClock, pg: asyncpg.Connection
) -> None:
    """A draw holds its release's row for seconds: a withdrawal sent meanwhile must not hold
    a pooled connection waiting for it (ten of them would take a worker's pool from every
    confirm). It is answered 503 with Retry-After, and nothing changes."""
    await api.site()
    release = (await api.publish_draw([1]))["id"]
    entry = (await api.enter(release, applicant(), ip(1))).body
    path = f"/v1/releases/{release}/entries/{entry['entry_id']}"
    auth = {"Authorization": f"Bearer {entry['entry_token']}"}
    async with pg.transaction():  # as run_draw holds it
        await pg.execute("SELECT 1 FROM releases WHERE id = $1 FOR UPDATE", release)
        refused = await api.call("DELETE", path, headers=auth)
        assert refused.status == 503, refused.body
        assert int(refused.headers["Retry-After"]) >= 1
        # Told at once (the lock's wait), not after the statement's 5 s timeout.
        assert refused.body["detail"] == "The release is being drawn or changed: try again"
    assert await entry_status(api, release, entry) == {"status": "registered"}
    assert (await api.call("DELETE", path, headers=auth)).status == 204


async def test_a_draw_failing_does_not_hold_back_the_next(
    api: Api, clock: FakeClock, pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One draw that fails, at its freeze (here: PostgreSQL refuses the update of its row,
    as a bug or its data could) or at its draw (a store error of its own: a slot row it
    must lock, locked elsewhere for longer than it waits), is counted for the alert: the
    others are frozen and drawn in the same pass, and it is once it can be. Only
    PostgreSQL down ends the pass. But a later draw of its own procedure waits for it:
    run first, it took the free places the failing one carries over (a review)."""
    await api.site("bobigny", ("renouvellement", "naturalisation"))
    stuck = (await api.publish_draw([1]))["id"]
    later = (await api.publish_draw([1], procedure="naturalisation", draw_in_s=90060))["id"]
    behind = (await api.publish_draw([1], draw_in_s=90060))["id"]  # stuck's procedure
    for n, release in enumerate((stuck, later, behind)):
        assert (await api.enter(release, applicant(), ip(n))).status == 201
    lottery = api.client.app[LOTTERY]
    monkeypatch.setattr(store_module, "DRAW_TIMEOUT_S", 0.5)
    registry = api.client.app[RESERVATIONS].metrics.registry
    frozen = "SELECT id FROM releases WHERE entries_digest IS NOT NULL"
    await pg.execute(
        """CREATE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql
           AS $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$"""
    )
    try:
        await pg.execute(
            f"""CREATE TRIGGER test_refuse BEFORE UPDATE OF entries_digest ON releases
                FOR EACH ROW WHEN (OLD.id = '{stuck}') EXECUTE FUNCTION test_refuse()"""
        )
        clock.advance(86401)
        assert await lottery.run_due() == []  # nothing due yet
        assert {r["id"] for r in await pg.fetch(frozen)} == {later, behind}
        failures = "guichet_draw_failures_total"
        assert registry.get_sample_value(failures, {"step": "freeze"}) == 1
    finally:
        await pg.execute("DROP TRIGGER IF EXISTS test_refuse ON releases")
        await pg.execute("DROP FUNCTION test_refuse()")
    clock.advance(3700)
    async with pg.transaction():  # its slot: the draw waits for it
        await pg.execute("SELECT 1 FROM slots WHERE release_id = $1 FOR UPDATE", stuck)
        [outcome] = await lottery.run_due()  # not behind, which waits for stuck
    assert outcome.release_id == later
    assert registry.get_sample_value(failures, {"step": "draw"}) == 1
    assert [o.release_id for o in await lottery.run_due()] == [stuck, behind]
    assert draw.verify((await api.call("GET", f"/v1/releases/{stuck}/draw")).body) == []


async def test_a_draw_being_run_elsewhere_is_not_waited_for(
    api: Api, clock: FakeClock, pg: asyncpg.Connection
) -> None:
    """A draw takes seconds, and another worker's sweeper may come to it meanwhile (the
    sweeper's lock lapses): it passes it by, its freeze as its draw, and the next draws,
    rather than queue behind it (for up to the draw's 300 s), with every other worker's
    sweeper after it. So for a draw of the same procedure at the same site, which shares
    its carried places."""
    await api.site()
    release = (await api.publish_draw([2]))["id"]
    for n in range(3):
        assert (await api.enter(release, applicant(), ip(n))).status == 201
    clock.advance(90061)  # a minute past its time
    lottery = api.client.app[LOTTERY]
    registry = api.client.app[RESERVATIONS].metrics.registry
    async with pg.transaction():  # as another worker's run_draw (or freeze) holds it
        await pg.execute("SELECT 1 FROM releases WHERE id = $1 FOR UPDATE", release)
        assert await asyncio.wait_for(lottery.run_due(), 5) == []
    assert await pg.fetchval("SELECT entries_digest FROM releases") is None  # next time
    async with pg.transaction():  # another draw of the procedure at the site is running
        key = "draw:bobigny:renouvellement"
        await pg.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", key)
        assert await asyncio.wait_for(lottery.run_due(), 5) == []
    for step in ("draw", "freeze"):
        assert registry.get_sample_value("guichet_draw_failures_total", {"step": step}) == 0
    # Passed by without an error: what the GuichetDrawOverdue alert counts, a minute late.
    assert registry.get_sample_value("guichet_draws_overdue") == 1
    [outcome] = await lottery.run_due()
    assert outcome.release_id == release
    assert registry.get_sample_value("guichet_draws_overdue") == 0


async def test_a_draw_record_is_read_once_and_kept(
    api: Api, clock: FakeClock, pg: asyncpg.Connection
) -> None:
    """Everyone looks at a draw's record when it is published, and a record lists every
    entry: twenty requests at once read it once, and later requests are answered from the
    worker's copy (a record never changes once written: here the stored one is altered
    behind the worker's back, and it still answers the record it read)."""
    await api.site()
    release, _, _ = await run_draw_flow(api, clock, 4, [2])
    lottery = api.client.app[LOTTERY]
    assert (await api.call("GET", f"/v1/releases/{release}/draw")).status == 409  # not yet
    assert (await sweep_once(api.client.app[RESERVATIONS], reconcile=False, lottery=lottery)).draws
    reads = []
    record = lottery.record

    async def counted(release_id: str) -> dict[str, Any]:
        reads.append(release_id)
        return await record(release_id)

    lottery.record = counted  # type: ignore[method-assign]
    path = f"/v1/releases/{release}/draw"
    replies = await asyncio.gather(*(api.call("GET", path) for _ in range(20)))
    assert reads == [release]
    assert {r.status for r in replies} == {200}
    assert all(r.body == replies[0].body for r in replies)
    assert draw.verify(replies[0].body) == []
    await pg.execute("UPDATE draws SET record = '{}' WHERE release_id = $1", release)
    assert (await api.call("GET", path)).body == replies[0].body
    assert reads == [release]


async def test_the_draw_runs_once_with_workers_racing(
    api: Api, clock: FakeClock, settings: Any, pg: asyncpg.Connection
) -> None:
    await api.site()
    release, _, _ = await run_draw_flow(api, clock, 7, [3])
    apps = [create_app(settings, clock=clock, bucket_clock=clock, sweep=False) for _ in range(4)]
    clients = [TestClient(TestServer(app)) for app in apps]
    for c in clients:
        await c.start_server()
    try:
        outcomes = await asyncio.gather(*(c.app[LOTTERY].run(release) for c in clients))
    finally:
        for c in clients:
            await c.close()
    assert sum(o is not None for o in outcomes) == 1
    assert await pg.fetchval("SELECT count(*) FROM bookings WHERE channel = 'draw'") == 3
    assert await pg.fetchval("SELECT count(*) FROM draws") == 1


async def test_a_crash_mid_draw_recovers_to_the_same_result(
    api: Api, clock: FakeClock, pg: asyncpg.Connection
) -> None:
    await api.site()
    release, entries, _ = await run_draw_flow(api, clock, 8, [2, 2])
    lottery = api.client.app[LOTTERY]
    row = await pg.fetchrow("SELECT seed FROM releases WHERE id = $1", release)
    digests_now = [draw.entry_digest(e["entry_id"]) for e in entries]
    slots = await pg.fetch(
        "SELECT id, starts_at, capacity FROM slots WHERE release_id = $1", release
    )
    expected = draw.allocate(
        row["seed"],
        digests_now,
        "",
        [draw.Places(s["id"], s["starts_at"].isoformat(), s["capacity"]) for s in slots],
    )

    def crash() -> str:
        raise RuntimeError("the process died after allocating, before booking")

    store = lottery.store
    try:
        await store.run_draw(release, lottery._now(), lambda _: b"x" * 32, crash)
    except RuntimeError:
        pass
    else:
        raise AssertionError("the crash did not happen")
    assert await pg.fetchval("SELECT count(*) FROM draws") == 0
    assert await pg.fetchval("SELECT count(*) FROM bookings") == 0
    assert (await lottery.run(release)) is not None
    rec = (await api.call("GET", f"/v1/releases/{release}/draw")).body
    assert rec["allocation"] == expected


async def test_a_drawn_slot_is_listed_free_at_once_when_its_booking_is_cancelled(
    api: Api, clock: FakeClock, pg: asyncpg.Connection
) -> None:
    """A draw's bookings are in Redis's counts (its listing) from the draw on: a cancel
    frees the place there at once, for the listing's next second (API.md), and a place
    the prefecture withdraws with its cancel is not shown free. Redis, told at each
    cancel, has nothing for the reconcile to correct (each correction counts for an
    alert)."""
    await api.site()
    release, _, _ = await run_draw_flow(api, clock, 3, [2])
    assert (await api.client.app[LOTTERY].run(release)).allocated == 2  # type: ignore[union-attr]
    listing = f"/v1/releases/{release}/slots"

    async def free() -> list[int]:
        clock.advance(1.5)  # past the listing's cache
        return [s["free"] for s in (await api.call("GET", listing)).body["slots"]]

    assert await free() == [0]
    query = "SELECT reference FROM bookings WHERE release_id = $1 ORDER BY reference"
    refs = [r["reference"] for r in await pg.fetch(query, release)]
    returned = await api.call("DELETE", f"/v1/admin/bookings/{refs[0]}", headers=ADMIN)
    assert returned.status == 204
    assert await free() == [1]
    withdrawn = await api.call(
        "DELETE", f"/v1/admin/bookings/{refs[1]}?by=prefecture&place=withdraw", headers=ADMIN
    )
    assert withdrawn.status == 204
    assert await free() == [1]
    assert await api.client.app[RESERVATIONS].recovery.reconcile(release) == 0


async def test_a_cancelled_draw_place_goes_to_the_next_draw(
    api: Api, clock: FakeClock, pg: asyncpg.Connection
) -> None:
    await api.site()
    first = (await api.publish_draw([1], starts_in_days=10))["id"]
    winner = (await api.enter(first, applicant(), ip(1))).body
    clock.advance(90001)
    lottery = api.client.app[LOTTERY]
    assert (await lottery.run(first)).allocated == 1  # type: ignore[union-attr]
    won = await entry_status(api, first, winner)
    r = await api.call(
        "DELETE",
        f"/v1/bookings/{won['booking']['reference']}",
        headers={"Authorization": f"Bearer {won['cancel_token']}"},
    )
    assert r.status == 204
    # Not back online: a draw release takes no holds (test_entries_and_windows), nor
    # issues a challenge once its registration is over.
    challenge = await api.call(
        "POST", "/v1/challenges", {"release": first}, {"X-Forwarded-For": ip(2)}
    )
    assert challenge.status == 409 and challenge.body["type"] == "/problems/not-open"
    second = (await api.publish_draw([1], starts_in_days=10))["id"]
    for i in range(3):
        assert (await api.enter(second, applicant(), ip(10 + i))).status == 201
    clock.advance(90001)
    outcome = await lottery.run(second)
    assert outcome is not None and (outcome.places, outcome.allocated, outcome.carried) == (2, 2, 1)
    rec = (await api.call("GET", f"/v1/releases/{second}/draw")).body
    assert sorted(rec["allocation"].values()) == sorted(
        [won["booking"]["slot"]["id"], f"{second}.000"]
    )
    assert draw.verify(rec) == []
    metrics = (await api.call("GET", "/metrics")).body
    assert "guichet_draw_places_carried_total 1.0" in metrics
    assert "guichet_draws_total 2.0" in metrics


async def test_a_draw_names_its_beacons_source_when_it_is_published(
    api: Api, clock: FakeClock, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A beacon is worth its source: named when the release is published, it is public
    from then on and in the record, so that the value staff set later can be checked
    against it, instead of being one an insider who knows the seed could choose. Only a
    draw has one, and no PATCH changes it."""
    await api.site()
    now = datetime.fromtimestamp(clock.now, UTC)
    source = "EuroMillions, the draw of 2026-12-04 (its five numbers, then its two stars)"
    body = {
        "site": "bobigny",
        "procedure": "renouvellement",
        "mode": "draw",
        "registration_opens_at": (now - timedelta(minutes=1)).isoformat(),
        "registration_closes_at": (now + timedelta(days=1)).isoformat(),
        "draw_at": (now + timedelta(days=1, hours=1)).isoformat(),
        "beacon_source": source,
        "slots": [
            {
                "starts_at": (now + timedelta(days=3)).isoformat(),
                "duration_minutes": 15,
                "capacity": 1,
            }
        ],
    }
    published = await api.call("POST", "/v1/admin/releases", body, ADMIN)
    assert published.status == 201, published.body
    release = published.body["release"]["id"]
    [listed] = (await api.call("GET", "/v1/releases")).body["releases"]
    assert listed["beacon_source"] == source
    path = f"/v1/admin/releases/{release}"
    changed = await api.call("PATCH", path, {"beacon_source": "another"}, ADMIN)
    assert changed.status == 400, changed.body
    fcfs = {
        **{k: v for k, v in body.items() if not k.startswith(("registration", "draw"))},
        "mode": "fcfs",
        "opens_at": now.isoformat(),
    }
    refused = await api.call("POST", "/v1/admin/releases", fcfs, ADMIN)
    assert refused.status == 400 and "beacon_source" in str(refused.body["errors"]), refused.body
    await api.enter(release, applicant(), ip(1))
    clock.advance(86401)
    await api.client.app[LOTTERY].run_due()  # frozen
    beacon = "04 17 23 31 48 * 02 09"
    assert (await api.call("PUT", f"{path}/beacon", {"beacon": beacon}, ADMIN)).status == 200
    clock.advance(3600)
    await api.client.app[LOTTERY].run_due()  # drawn
    rec = (await api.call("GET", f"/v1/releases/{release}/draw")).body
    assert (rec["beacon"], rec["beacon_source"]) == (beacon, source) and draw.verify(rec) == []
    saved = tmp_path / "record.json"
    saved.write_text(json.dumps(rec))
    assert cli.main(["verify-draw", str(saved)]) == 0
    assert source in capsys.readouterr().out


async def test_beacon_window(api: Api, clock: FakeClock) -> None:
    """The beacon comes after the entry list is frozen, so that no entry can be registered
    knowing it (a worker whose clock lags takes entries until the freeze), and it is public
    in the listing from then on."""
    await api.site()
    release = (await api.publish_draw([1]))["id"]
    path = f"/v1/admin/releases/{release}/beacon"
    assert (await api.call("PUT", path, {"beacon": "too-early"}, ADMIN)).status == 409
    await api.enter(release, applicant(), ip(1))
    clock.advance(86401)
    unfrozen = await api.call("PUT", path, {"beacon": "loto-2026-11-28"}, ADMIN)
    assert unfrozen.status == 409 and "frozen" in unfrozen.body["detail"], unfrozen.body
    await api.client.app[LOTTERY].run_due()  # the sweeper's: it freezes the list
    assert (await api.call("PUT", path, {"beacon": "loto-2026-11-28"}, ADMIN)).status == 200
    [listed] = (await api.call("GET", "/v1/releases")).body["releases"]
    assert listed["beacon"] == "loto-2026-11-28" and "entries_digest" in listed, listed
    # Set once: the same value again is a retry; another, tried for a better rank, is not.
    assert (await api.call("PUT", path, {"beacon": "loto-2026-11-28"}, ADMIN)).status == 200
    changed = await api.call("PUT", path, {"beacon": "loto-2026-11-29"}, ADMIN)
    assert changed.status == 409 and "cannot change" in changed.body["detail"], changed.body
    clock.advance(3600)
    await api.client.app[LOTTERY].run_due()
    rec = (await api.call("GET", f"/v1/releases/{release}/draw")).body
    assert rec["beacon"] == "loto-2026-11-28" and draw.verify(rec) == []
    assert (await api.call("PUT", path, {"beacon": "too-late"}, ADMIN)).status == 409


async def test_a_beacon_sent_while_the_draw_runs_is_refused(
    api: Api, clock: FakeClock, pg: asyncpg.Connection
) -> None:
    """A draw holds its release's row while it runs. A beacon sent just before the draw
    time (or by a worker whose clock lags) waited for the row and then judged the draw by
    the snapshot its statement began with: not drawn yet. It was set and audited, and
    answered 200, while the draw had run without it. It is refused now."""
    await api.site()
    release = (await api.publish_draw([1], closes_in_s=60, draw_in_s=3600))["id"]
    await api.enter(release, applicant(), ip(1))
    clock.advance(61)
    lottery = api.client.app[LOTTERY]
    await lottery.run_due()  # the list frozen: a beacon may come
    blocker = await asyncpg.connect(DATABASE_URL)

    async def waiting(lock: str) -> bool:
        query = "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = $1"
        return bool(await pg.fetchval(query, lock))

    try:
        tx = blocker.transaction()
        await tx.start()
        # A confirm's share of the caps lock: the draw, holding its row, waits for it.
        await blocker.execute(
            "SELECT pg_advisory_xact_lock_shared(hashtextextended('booking-caps', 0))"
        )
        clock.advance(3600)
        drawing = asyncio.create_task(lottery.run_due())
        await poll(lambda: waiting("advisory"), lambda: "the draw never waited for the caps")
        clock.advance(-62)  # the beacon's worker: a second before the draw time by its clock
        path = f"/v1/admin/releases/{release}/beacon"
        beacon = asyncio.create_task(api.call("PUT", path, {"beacon": "late"}, ADMIN))
        await poll(lambda: waiting("transactionid"), lambda: "the beacon never waited")
        await tx.rollback()
        assert [done.release_id for done in await drawing] == [release]
        refused = await beacon
    finally:
        await blocker.close()
    assert refused.status == 409, refused.body
    record = (await api.call("GET", f"/v1/releases/{release}/draw")).body
    assert record["beacon"] == ""
    assert await pg.fetchval("SELECT beacon FROM releases WHERE id = $1", release) is None
    assert not await pg.fetchval("SELECT count(*) FROM audit_log WHERE action = 'draw.beacon'")


async def test_a_draws_places_are_fixed_from_closing_to_the_draw(
    api: Api, clock: FakeClock
) -> None:
    """Whoever knows the seed knows the ranking once the list is frozen and the beacon is
    set: a place added or taken away then moves the cut-off onto the person they choose.
    The places of a draw change before registration closes, and after the draw, except
    while the procedure's next draw, which its free places carry over to, has closed and
    is not drawn."""
    await api.site()
    release = await api.publish_draw([2])
    path = f"/v1/admin/releases/{release['id']}"
    slot = release["slots"][0]["id"]

    async def capacity(n: int) -> Any:
        return await api.call("PATCH", path, {"slots": [{"id": slot, "capacity": n}]}, ADMIN)

    assert (await capacity(3)).status == 200
    clock.advance(86401)  # registration closed
    for n in (4, 1):
        fixed = await capacity(n)
        assert fixed.status == 400 and "fixed" in str(fixed.body["errors"]), fixed.body
    clock.advance(3600)
    await api.client.app[LOTTERY].run_due()  # drawn
    assert (await capacity(2)).status == 200
    following = await api.publish_draw([1], closes_in_s=60, draw_in_s=3600)
    clock.advance(61)  # the next draw closed: this one's free place carries over to it
    carried = await capacity(3)
    assert carried.status == 400 and following["id"] in str(carried.body["errors"]), carried.body
    clock.advance(3600)
    await api.client.app[LOTTERY].run_due()
    assert (await capacity(3)).status == 200


async def test_the_order_of_closed_draws_is_fixed(api: Api, clock: FakeClock) -> None:
    """A draw carries over the free places of the procedure's draws run before it, and
    takes only slots that start after it: moving a closed draw's time, or putting a new
    draw before it, changed its places after the close (an audit moved one draw after
    another, which then drew one place for four entries instead of three), and whoever
    knows the seed could choose the cut-off by it."""
    await api.site("bobigny", ("renouvellement", "naturalisation"))
    first = await api.publish_draw([3], closes_in_s=60, draw_in_s=600)
    second = await api.publish_draw([1], closes_in_s=60, draw_in_s=1200)
    assert (await api.enter(first["id"], applicant(), ip(1))).status == 201
    for i in range(4):
        assert (await api.enter(second["id"], applicant(), ip(10 + i))).status == 201
    clock.advance(61)  # both closed, neither drawn

    def at(seconds: float) -> str:
        return datetime.fromtimestamp(clock.now + seconds, UTC).isoformat()

    for release in (first, second):
        moved = await api.call(
            "PATCH", f"/v1/admin/releases/{release['id']}", {"draw_at": at(3000)}, ADMIN
        )
        assert moved.status == 400, moved.body
        assert moved.body["errors"][0]["field"] == "draw_at", moved.body
    # A new draw of the procedure may come after the closed ones, not between them.
    before = await api.call(
        "POST",
        "/v1/admin/releases",
        {
            "site": "bobigny",
            "procedure": "renouvellement",
            "mode": "draw",
            "registration_opens_at": at(-60),
            "registration_closes_at": at(30),
            "draw_at": at(900),
            "slots": [{"starts_at": at(86400 * 5), "duration_minutes": 15, "capacity": 1}],
        },
        ADMIN,
    )
    assert before.status == 400 and second["id"] in str(before.body["errors"]), before.body
    assert before.body["errors"][0]["field"] == "draw_at", before.body
    later = await api.publish_draw([1], closes_in_s=30, draw_in_s=1200)
    moved = await api.call(
        "PATCH", f"/v1/admin/releases/{later['id']}", {"draw_at": at(900)}, ADMIN
    )
    assert moved.status == 400 and second["id"] in str(moved.body["errors"]), moved.body
    assert (
        await api.call("PATCH", f"/v1/admin/releases/{later['id']}", {"draw_at": at(1300)}, ADMIN)
    ).status == 200
    # Another procedure's draws carry no places to these.
    await api.publish_draw([1], procedure="naturalisation", closes_in_s=30, draw_in_s=90)
    clock.advance(1200)
    await api.client.app[LOTTERY].run_due()
    # The second draw has the places it had at its close: its own, and the first's two.
    record = (await api.call("GET", f"/v1/releases/{second['id']}/draw")).body
    assert sum(p["count"] for p in record["places"]) == 3, record["places"]
    assert len(record["allocation"]) == 3 and draw.verify(record) == []


async def test_no_entry_slips_in_after_the_list_is_frozen(
    api: Api, clock: FakeClock, pg: asyncpg.Connection
) -> None:
    """A late request (a slow path, or a worker whose clock lags) finds the list frozen: no
    entry is added, and a withdrawal keeps the entry in the list, to be passed over."""
    await api.site()
    release = (await api.publish_draw([1]))["id"]
    entry = (await api.enter(release, applicant(), ip(1))).body
    lottery = api.client.app[LOTTERY]
    from datetime import UTC, datetime, timedelta

    later = datetime.fromtimestamp(clock.now, UTC) + timedelta(days=2)
    assert await lottery.store.freeze_entries(release, later)
    assert not await lottery.store.freeze_entries(release, later)  # frozen once
    late = await api.enter(release, applicant(), ip(2))
    assert late.status == 409 and late.body["type"] == "/problems/not-open"
    r = await api.call(
        "DELETE",
        f"/v1/releases/{release}/entries/{entry['entry_id']}",
        headers={"Authorization": f"Bearer {entry['entry_token']}"},
    )
    assert r.status == 204
    row = await pg.fetchrow("SELECT status, withdrawn_frozen FROM entries")
    assert tuple(row.values()) == ("withdrawn", True)


async def test_people_at_the_counter_enter_the_draw(
    api: Api, clock: FakeClock, pg: asyncpg.Connection
) -> None:
    """The non-digital channel of a draw release is an entry, registered by staff without
    proof of work, drawn like every other: a booking by staff would take a place outside
    the draw, and is refused. An entry's retry with its Idempotency-Key gets the same entry
    back; without one, the person's second entry is refused, as online. Each entry staff
    register is in the audit log, as their bookings are."""
    await api.site()
    release = (await api.publish_draw([2]))["id"]
    path = f"/v1/admin/releases/{release}/entries"
    person = applicant()

    async def enter(who: dict[str, str], key: str | None = None) -> Any:
        headers = {**ADMIN, **({"Idempotency-Key": key} if key else {})}
        return await api.call("POST", path, {"applicant": who}, headers)

    first = await enter(person, "counter-42")
    assert first.status == 201 and first.body["status"] == "registered", first.body
    again = await enter(person, "counter-42")
    assert (again.status, again.body) == (201, first.body)
    second = await enter(person)
    assert (second.status, second.body["type"]) == (409, "/problems/identity-already-booked")
    corrected = await enter({**person, "given_names": "Corrigé"}, "counter-42")
    # Another request, not the first one's replay with the name silently dropped.
    assert (corrected.status, corrected.body["type"]) == (409, "/problems/identity-already-booked")
    other_desk = await enter(applicant(), "counter-42")  # the same key, another person
    assert other_desk.status == 201 and other_desk.body["entry_id"] != first.body["entry_id"]
    audited = await pg.fetch(
        "SELECT actor, subject FROM audit_log WHERE action = 'entry.create' ORDER BY id"
    )
    assert [tuple(r.values()) for r in audited] == [
        ("staff", first.body["entry_id"]),
        ("staff", other_desk.body["entry_id"]),
    ]
    assert await entry_status(api, release, first.body) == {"status": "registered"}
    assert (await api.call("POST", path, {"applicant": applicant()})).status == 401

    slot = (await api.call("GET", f"/v1/admin/releases/{release}", headers=ADMIN)).body
    staff = {"slot_id": slot["release"]["slots"][0]["id"], "applicant": applicant()}
    booked = await api.call("POST", "/v1/admin/bookings", staff, ADMIN)
    assert (booked.status, booked.body["type"]) == (409, "/problems/not-open"), booked.body
    assert path in booked.body["detail"]
    fcfs = (await api.publish([1]))["id"]
    elsewhere = await api.call(
        "POST", f"/v1/admin/releases/{fcfs}/entries", {"applicant": person}, ADMIN
    )
    # A first-come release has no draw to enter: 409 not-open, as online.
    assert (elsewhere.status, elsewhere.body["type"]) == (409, "/problems/not-open")

    clock.advance(86400)  # registration closed
    late = await enter(applicant())
    assert (late.status, late.body["type"]) == (409, "/problems/not-open")
    assert (await enter(person, "counter-42")).body == first.body  # a retry still is
    clock.advance(4000)
    domain = api.client.app[RESERVATIONS]
    assert (await sweep_once(domain, reconcile=False, lottery=api.client.app[LOTTERY])).draws == 1
    won = await entry_status(api, release, first.body)
    assert won["status"] == "won" and won["booking"]["status"] == "confirmed", won


async def test_draw_records_read_in_turn_are_read_once_each(api: Api, clock: FakeClock) -> None:
    """Every record is public. Kept by count (the last four), a client asking for five
    in turn made each of its requests a read of the whole record from PostgreSQL, then
    JSON and gzip: megabytes, and a tenth of a second of the worker, for a large draw.
    They are kept by size now."""
    await api.site()
    releases = [(await api.publish_draw([1]))["id"] for _ in range(6)]
    for n, release in enumerate(releases):
        assert (await api.enter(release, applicant(), ip(n + 1))).status == 201
    clock.advance(90001)
    lottery = api.client.app[LOTTERY]
    done = await sweep_once(api.client.app[RESERVATIONS], reconcile=False, lottery=lottery)
    assert done.draws == len(releases)
    reads: list[str] = []
    record = lottery.record

    async def counted(release_id: str) -> dict[str, Any]:
        reads.append(release_id)
        return await record(release_id)

    lottery.record = counted  # type: ignore[method-assign]
    for _ in range(3):
        for release in releases:
            reply = await api.call("GET", f"/v1/releases/{release}/draw")
            assert reply.status == 200 and draw.verify(reply.body) == [], reply.body
    assert sorted(reads) == sorted(releases)
