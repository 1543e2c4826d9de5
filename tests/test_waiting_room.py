"""The waiting room through HTTP, on standalone Redis and on Redis Cluster: joining,
polling, admission in join order at the sale's rate (counted on Redis's own clock, not
the test machine's), the pre-start shuffle, the stock (sold out, units back), passes,
forged input, and the admitter's lease passing to another process.

No timing threshold anywhere: waits are ``eventually`` (a hang guard only); the rate is
checked from the admitter's own bucket clock as the admin API shows it."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

from redis.crc import key_slot

from gateway.admission.room_state import RoomState
from gateway.app import Gateway
from gateway.clock import now_ms, parse_rfc3339
from gateway.models import Sale
from gateway.store.keys import shard_of
from gateway.store.scripts.queue import Advance
from tests.support.api import Api, Backend, new_sku, serve
from tests.support.delivery import eventually


def _at(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


async def _until_ms(when: int) -> None:
    await asyncio.sleep(max(0.0, (when - now_ms()) / 1000 + 0.05))


async def join(api: Api, sku: str, user: int) -> tuple[int, dict[str, Any], dict[str, str]]:
    resp = await api.client.post(f"/api/queue/{sku}", headers={"X-User-Id": str(user)})
    return resp.status, await resp.json(), dict(resp.headers)


async def poll(api: Api, sku: str, user: int, ticket: str) -> tuple[int, dict[str, Any]]:
    resp = await api.client.get(f"/api/queue/{sku}/{ticket}", headers={"X-User-Id": str(user)})
    return resp.status, await resp.json()


async def buy(api: Api, sku: str, user: int, queue_pass: str | None) -> tuple[int, dict]:
    headers = {"X-Queue-Pass": queue_pass} if queue_pass is not None else {}
    status, body, _ = await api.buy(sku, user, f"key-{sku}-{user}", headers=headers)
    return status, body


def room(sale: dict[str, Any]) -> dict[str, Any]:
    return sale["waiting_room"]


def assert_rate(counts: dict[str, Any]) -> None:
    """Admissions so far within what the rate allows on Redis's clock since the bucket
    began (it begins empty; one second's burst is the most it can hold)."""
    elapsed_s = (counts["rate_at_ms"] - counts["rate_since_ms"]) / 1000
    assert counts["admitted"] <= counts["admit_rate"] * elapsed_s + 1e-6, counts


def assert_prefix(order: list[int], admitted: set[int]) -> None:
    """The admitted users are the first ones of ``order``."""
    assert set(order[:len(admitted)]) == admitted, (order, admitted)


class Crowd:
    """Users with tickets, polled until admitted; what they saw, in order."""

    def __init__(self, sku: str) -> None:
        self.sku = sku
        self.tickets: dict[int, str] = {}
        self.passes: dict[int, str] = {}
        self.positions: dict[int, list[int]] = {}

    async def join(self, api: Api, user: int) -> dict[str, Any]:
        status, body, headers = await join(api, self.sku, user)
        assert status in (200, 202), body
        if status == 202:
            assert body["code"] == "QUEUED" and int(headers["Retry-After"]) >= 1
            assert body["units_left"] >= 0 and body["eta_s"] >= 0
            self.tickets[user] = body["ticket"]
            self._saw(user, body)
        else:
            assert body["code"] == "ADMITTED"
            self.passes[user] = body["pass"]
        return body

    def _saw(self, user: int, body: dict[str, Any]) -> None:
        if body.get("position") is not None:
            seen = self.positions.setdefault(user, [])
            assert not seen or body["position"] <= seen[-1], (user, seen, body)  # never grows
            seen.append(body["position"])

    async def poll_round(self, api: Api, order: list[int], *, unavailable_ok: bool = False
                         ) -> set[int]:
        """Poll every waiting user, last joined first (so that a later answer never
        comes from an older state than an earlier one about a user ahead of it); the
        admitted users so far. ``unavailable_ok``: a 503 (a Redis node failing over) is
        an answer to skip."""
        for user in reversed(order):
            if user in self.passes:
                continue
            status, body = await poll(api, self.sku, user, self.tickets[user])
            if status == 503 and unavailable_ok:
                assert body["code"] == "UNAVAILABLE"
                return set(self.passes)  # the rest of the round waits for the next one
            assert status in (200, 202), body
            if status == 200:
                assert body["code"] == "ADMITTED" and body["expires_in"] > 0
                assert body["units_left"] >= 0
                self.passes[user] = body["pass"]
            else:
                assert body["ticket"] == self.tickets[user]
                self._saw(user, body)
        return set(self.passes)


# -- joining and passes -------------------------------------------------------------------------

async def test_joining_twice_gives_the_same_ticket_and_a_pass_lets_the_user_buy(
        backend: Backend, sku: str) -> None:
    async with serve(backend.settings(key_mode="client")) as api:
        created = await api.create_sale(sku, 10, shards=4, waiting_room={"admit_rate": 50},
                                        starts_at=_at(1.5))
        assert created["waiting_room"] == {"admit_rate": 50.0}
        first = await join(api, sku, 7)
        again = await join(api, sku, 7)
        assert first[0] == again[0] == 202, (first, again)
        assert first[1]["ticket"] == again[1]["ticket"]
        assert first[1]["position"] is None  # before the start: the order is not drawn yet
        assert first[1]["units_left"] == 10 and first[1]["eta_s"] >= 1
        assert room(await api.sale(sku))["joined"] == 1  # one place, however often asked
        status, body = await buy(api, sku, 7, None)
        assert (status, body["code"]) == (403, "SALE_NOT_STARTED"), body
        await _until_ms(parse_rfc3339(created["starts_at"]))
        status, body = await buy(api, sku, 7, None)
        assert (status, body["code"]) == (403, "QUEUE_PASS_REQUIRED"), body
        crowd = Crowd(sku)
        crowd.tickets[7] = first[1]["ticket"]
        await eventually(lambda: _admitted(crowd, api, [7]), "user 7 is admitted")
        status, body = await buy(api, sku, 7, crowd.passes[7])
        assert (status, body["code"]) == (200, "OK"), body
        # Admitted: joining again answers ADMITTED (the same admission, counted once).
        status, body, _ = await join(api, sku, 7)
        assert (status, body["code"]) == (200, "ADMITTED"), body
        counts = room(await api.sale(sku))
        assert (counts["joined"], counts["admitted"], counts["waiting"]) == (1, 1, 0), counts


async def _admitted(crowd: Crowd, api: Api, order: list[int]) -> bool:
    return set(order) <= await crowd.poll_round(api, order)


async def test_a_sale_without_a_waiting_room_admits_at_once(backend: Backend, sku: str) -> None:
    async with serve(backend.settings(key_mode="client")) as api:
        await api.create_sale(sku, 3, shards=2)
        status, body, _ = await join(api, sku, 1)
        assert (status, body["code"]) == (200, "ADMITTED") and body["pass"], body
        assert (await buy(api, sku, 1, None))[0] == 200  # no pass needed here
        status, body, _ = await join(api, new_sku(), 1)
        assert (status, body["code"]) == (404, "SALE_NOT_FOUND"), body


# -- order and rate -----------------------------------------------------------------------------

async def test_admission_follows_join_order_across_shards_at_the_rate(backend: Backend,
                                                                      sku: str) -> None:
    rate = 20
    async with serve(backend.settings()) as api:
        await api.create_sale(sku, 1000, shards=4, waiting_room={"admit_rate": rate})
        crowd = Crowd(sku)
        users = [1000 + 7 * i for i in range(30)]  # spread over the 4 shards
        assert len({shard_of(u, 4) for u in users}) == 4
        for user in users:
            await crowd.join(api, user)
        rounds = 0

        async def all_admitted() -> bool:
            nonlocal rounds
            rounds += 1
            admitted = await crowd.poll_round(api, users)
            assert_prefix(users, admitted)  # first in, first out, across shards
            assert_rate(room(await api.sale(sku)))
            return admitted == set(users)

        await eventually(all_admitted, "everyone is admitted")
        counts = room(await api.sale(sku))
        assert (counts["joined"], counts["admitted"], counts["waiting"]) == (30, 30, 0)
        assert_rate(counts)
        assert rounds > 1  # admitted over time, not at once
        assert any(len(seen) > 1 for seen in crowd.positions.values())


async def test_those_who_join_before_the_start_are_shuffled(backend: Backend, sku: str) -> None:
    async with serve(backend.settings()) as api:
        created = await api.create_sale(sku, 1000, shards=4, waiting_room={"admit_rate": 200},
                                        starts_at=_at(2.0))
        crowd = Crowd(sku)
        users = list(range(500, 540))
        for user in users:
            body = await crowd.join(api, user)
            assert body["position"] is None
        await _until_ms(parse_rfc3339(created["starts_at"]))
        # The drawn order: the shards' scores, random numbers below every post-start score.
        store = api.gateway.store
        scores: dict[int, float] = {}
        for shard in range(4):
            members = await store.client.zrange(store.keys.shard(sku, shard).queue, 0, -1,
                                                withscores=True)
            scores.update({int(member): float(score) for member, score in members})
        assert set(scores) == set(users) and all(0 <= s < 1 for s in scores.values())
        drawn = sorted(users, key=lambda u: scores[u])
        assert drawn != users and len(set(scores.values())) == len(users)
        late = 900  # joins after the start: behind every pre-start ticket
        await crowd.join(api, late)

        async def all_admitted() -> bool:
            admitted = await crowd.poll_round(api, [*drawn, late])
            assert_prefix([*drawn, late], admitted)
            return len(admitted) == len(users) + 1

        await eventually(all_admitted, "everyone is admitted")
        assert_rate(room(await api.sale(sku)))


async def test_a_rate_below_one_a_second_admits_too(backend: Backend, sku: str) -> None:
    async with serve(backend.settings()) as api:
        await api.create_sale(sku, 10, shards=2, waiting_room={"admit_rate": 0.8})
        crowd = Crowd(sku)
        users = [21, 22]
        for user in users:
            await crowd.join(api, user)

        async def both_admitted() -> bool:
            admitted = await crowd.poll_round(api, users)
            assert_prefix(users, admitted)
            assert_rate(room(await api.sale(sku)))
            return admitted == set(users)

        await eventually(both_admitted, "both are admitted")


# -- the stock ----------------------------------------------------------------------------------

async def test_every_ticket_learns_of_a_sell_out_and_admission_resumes_when_units_come_back(
        backend: Backend, sku: str) -> None:
    async with serve(backend.settings(key_mode="client")) as api:
        await api.create_sale(sku, 2, shards=2, waiting_room={"admit_rate": 4})
        crowd = Crowd(sku)
        users = [11, 12, 13, 14, 15, 16]
        for user in users:
            await crowd.join(api, user)
        await eventually(lambda: _admitted(crowd, api, users[:2]), "two are admitted")
        orders = []
        for user in users[:2]:
            status, body = await buy(api, sku, user, crowd.passes[user])
            assert status == 200, body
            orders.append(body["order_no"])

        async def everyone_told(code: str) -> bool:
            answers = [await poll(api, sku, u, crowd.tickets[u]) for u in users[2:]]
            return all((status, body["code"], body["units_left"]) == (410, code, 0)
                       for status, body in answers)

        await eventually(lambda: everyone_told("SOLD_OUT"), "every ticket hears SOLD_OUT")
        status, body, _ = await join(api, sku, 99)
        assert (status, body["code"]) == (410, "SOLD_OUT"), body
        admitted_then = room(await api.sale(sku))["admitted"]
        resp = await api.client.post(f"/admin/orders/{orders[0]}/release",
                                     json={"reason": "cancelled"}, headers=api.admin)
        assert resp.status == 200, await resp.text()

        async def someone_buys() -> bool:
            for user in users[2:]:
                status, body = await poll(api, sku, user, crowd.tickets[user])
                if status == 200:
                    bought = await buy(api, sku, user, body["pass"])
                    assert bought[0] == 200, bought
                    return True
                assert status in (202, 410), body
            return False

        await eventually(someone_buys, "a waiting user is admitted again and buys")
        counts = room(await api.sale(sku))
        assert counts["admitted"] > admitted_then
        assert_rate(counts)


async def test_every_ticket_hears_the_sale_ended(backend: Backend, sku: str) -> None:
    async with serve(backend.settings()) as api:
        created = await api.create_sale(sku, 10, shards=2, waiting_room={"admit_rate": 0.5},
                                        ends_at=_at(1.5))
        crowd = Crowd(sku)
        for user in (1, 2, 3):
            await crowd.join(api, user)
        await _until_ms(parse_rfc3339(created["ends_at"]))
        for user, ticket in crowd.tickets.items():
            status, body = await poll(api, sku, user, ticket)
            assert (status, body["code"]) == (410, "SALE_ENDED"), body
        status, body, _ = await join(api, sku, 4)
        assert (status, body["code"]) == (410, "SALE_ENDED"), body


# -- bad input ----------------------------------------------------------------------------------

async def test_forged_and_borrowed_tickets_and_passes_are_refused(backend: Backend,
                                                                   sku: str) -> None:
    async with serve(backend.settings(key_mode="client")) as api:
        for rate in (0, -1, "5", True, None, [1]):
            await api.create_sale(new_sku(), 5, waiting_room={"admit_rate": rate}, expect=400)
        await api.create_sale(new_sku(), 5, waiting_room={"admit_rate": 1, "x": 2}, expect=400)
        await api.create_sale(sku, 5, shards=2, waiting_room={"admit_rate": 100})
        other = new_sku()
        await api.create_sale(other, 5, shards=2, waiting_room={"admit_rate": 100})
        crowd = Crowd(sku)
        await crowd.join(api, 1)
        ticket = crowd.tickets[1]
        for user, text in ((2, ticket), (1, ticket[:-2] + "AA"), (1, "0.0.AAAAAAAAAAAAAAAAAAAAAA"),
                           (1, "nonsense"), (3, ticket)):
            status, body = await poll(api, sku, user, text)
            assert (status, body["code"]) == (404, "TICKET_NOT_FOUND"), (user, text, body)
        status, body = await poll(api, other, 1, ticket)  # another sale's ticket
        assert (status, body["code"]) == (404, "TICKET_NOT_FOUND"), body
        await eventually(lambda: _admitted(crowd, api, [1]), "user 1 is admitted")
        good = crowd.passes[1]
        signer = await api.gateway.queue_signer()
        generation = (await api.gateway.sales.get(sku)).generation  # type: ignore[union-attr]
        expired = signer.issue_pass(sku, generation, 1, now=0)
        forged = good[:-3] + ("AAA" if not good.endswith("AAA") else "BBB")
        for user, text in ((1, None), (1, ""), (1, forged), (1, expired), (2, good),
                           (1, "garbage")):
            status, body = await buy(api, sku, user, text)
            assert (status, body["code"]) == (403, "QUEUE_PASS_REQUIRED"), (user, text, body)
        status, body = await buy(api, other, 1, good)  # a pass for another sale
        assert (status, body["code"]) == (403, "QUEUE_PASS_REQUIRED"), body
        assert (await buy(api, sku, 1, good))[0] == 200
        assert room(await api.sale(sku))["joined"] == 1


async def test_a_deleted_sale_takes_its_queue_with_it(backend: Backend, sku: str) -> None:
    async with serve(backend.settings()) as api:
        await api.create_sale(sku, 5, shards=2, waiting_room={"admit_rate": 0.5})
        crowd = Crowd(sku)
        for user in (1, 2, 3):
            await crowd.join(api, user)
        resp = await api.client.delete(f"/admin/sales/{sku}", headers=api.admin)
        assert resp.status == 204
        status, body = await poll(api, sku, 1, crowd.tickets[1])
        assert (status, body["code"]) == (404, "SALE_NOT_FOUND"), body
        store = api.gateway.store
        for shard in range(2):
            assert not await store.client.exists(store.keys.shard(sku, shard).queue)
        await api.create_sale(sku, 5, shards=2, waiting_room={"admit_rate": 0.5})
        status, body = await poll(api, sku, 1, crowd.tickets[1])  # the old sale's ticket
        assert (status, body["code"]) == (404, "TICKET_NOT_FOUND"), body
        assert room(await api.sale(sku))["joined"] == 0
        status, body, _ = await join(api, sku, 3)
        assert status == 202 and body["position"] == 1, body  # a fresh queue


# -- faults -------------------------------------------------------------------------------------

async def test_admission_goes_on_when_the_admitting_process_stops(backend: Backend,
                                                                   sku: str) -> None:
    """Two gateway processes (apps) on one Redis; the one holding the admitter's lease is
    closed mid-run. The other takes over: everyone is admitted, in join order, within
    the rate, with positions that never grow; the tickets live in Redis."""
    rate = 15
    settings = backend.settings()
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(serve(settings))
        second = await stack.enter_async_context(serve(settings))
        await first.create_sale(sku, 1000, shards=4, waiting_room={"admit_rate": rate})
        crowd = Crowd(sku)
        users = [3000 + 3 * i for i in range(24)]
        for i, user in enumerate(users):
            await crowd.join(first if i % 2 else second, user)
        apps = [first, second]

        async def some_admitted() -> bool:
            return len(await crowd.poll_round(first, users)) >= 5

        await eventually(some_admitted, "admission begins")
        await crowd.poll_round(second, users)  # both serve the sale: either may take over
        lease = first.gateway.store.keys.queue_lease(sku)
        holder = await first.gateway.store.client.get(lease)
        dying = next(api for api in apps if api.gateway.admitter.owner == holder)
        survivor = second if dying is first else first
        store = survivor.gateway.store
        admitted_before = room(await survivor.sale(sku))["admitted"]
        assert admitted_before < len(users)
        await dying.client.close()  # its admitter stops without giving the lease back

        async def all_admitted() -> bool:
            admitted = await crowd.poll_round(survivor, users)
            assert_prefix(users, admitted)
            assert_rate(room(await survivor.sale(sku)))
            return admitted == set(users)

        await eventually(all_admitted, "the other process admits everyone")
        assert await store.client.get(lease) == survivor.gateway.admitter.owner
        counts = room(await survivor.sale(sku))
        assert counts["admitted"] == len(users)


async def test_a_primary_killed_mid_run_loses_no_place_and_admits_nobody_twice(
        local_cluster: Any) -> None:
    """The primary holding the sale's admission state (its cursors and its bucket) is
    killed mid-run and started again, as an orchestrator would; its replica takes over.
    Every place survives (joins were on a replica before they were answered), admission
    goes on in join order within the rate, positions never grow."""
    cluster = local_cluster
    sku = new_sku()
    rate = 15
    settings = Backend("cluster", cluster.url, cluster).settings()
    victim = None
    try:
        async with serve(settings) as api:
            await api.create_sale(sku, 1000, shards=4, waiting_room={"admit_rate": rate})
            crowd = Crowd(sku)
            users = [5000 + 5 * i for i in range(24)]
            for user in users:
                await crowd.join(api, user)
            await eventually(lambda: _some_admitted(crowd, api, users, 4), "admission begins")
            state_key = api.gateway.store.keys.queue_state(sku)
            victim = cluster.primary_for_slot(key_slot(state_key.encode()))
            replica = cluster.replicas_of(victim)[0]
            await asyncio.to_thread(cluster.kill, victim)

            async def promoted() -> bool:
                await crowd.poll_round(api, users, unavailable_ok=True)
                try:
                    return cluster.primary_for_slot(key_slot(state_key.encode())) is replica
                except Exception:  # a node busy failing over; ask again
                    return False

            await eventually(promoted, "the replica is promoted")
            await asyncio.to_thread(cluster.restart, victim)  # back, as a replica

            async def all_admitted() -> bool:
                admitted = await crowd.poll_round(api, users, unavailable_ok=True)
                assert_prefix(users, admitted)
                return admitted == set(users)

            await eventually(all_admitted, "everyone is admitted after the failover")
            counts = room(await api.sale(sku))
            assert (counts["joined"], counts["admitted"]) == (len(users), len(users)), counts
            assert_rate(counts)
    finally:
        if victim is not None:
            await asyncio.to_thread(cluster.wait_until_healthy, 60)


async def _some_admitted(crowd: Crowd, api: Api, users: list[int], count: int) -> bool:
    return len(await crowd.poll_round(api, users)) >= count


# -- the admission script, called directly ---------------------------------------------------------

async def test_the_advance_script_admits_each_place_once_and_only_forward(backend: Backend,
                                                                           sku: str) -> None:
    """queue_advance.lua, without an admitter running: a repeat, a stale order or one
    from cursors ahead of the stored ones admits nothing; the bucket starts empty."""
    gw = Gateway.build(backend.settings())
    try:
        sale = await gw.store.create_sale(Sale(sku, 10, shards=2, admit_rate=4))
        assert sale is not None
        for user in (10, 11, 12, 13):  # two in each shard
            await gw.store.queue_join(sale, user, shard_of(user, 2), 0.5)

        def step(base: list[int], order: list[int]) -> Advance:
            return Advance(generation=sale.generation, units_left=10, rate=4, burst=4,
                           sold_out=False, joined=4, base=base, order=order)

        assert await gw.store.queue_advance(sale, step([0, 0], [0, 1])) == (0, 0)  # empty bucket
        await asyncio.sleep(0.6)  # at 4/s: at least 2.4 in the bucket now
        assert await gw.store.queue_advance(sale, step([0, 0], [0, 1])) == (2, 2)
        assert await gw.store.queue_advance(sale, step([0, 0], [0, 1])) == (0, 2)  # a repeat
        assert await gw.store.queue_advance(sale, step([5, 5], [0, 1])) == (0, 2)  # ahead: skipped
        state = RoomState.parse(await gw.store.queue_state(sku), sale.generation)
        assert (state.cursor(0), state.cursor(1), state.admitted) == (1, 1, 2)
        assert state.admitted <= 4 * (state.last_ms - state.since_ms) / 1000
        other = RoomState.parse(await gw.store.queue_state(sku), "another-generation")
        assert other.cursors == {} and other.admitted == 0
    finally:
        await gw.close()
