"""Several endpoints (issue 19): the choice of the next endpoint alone (custody.failover,
no sockets), then the client against fake TLS appliances (with the development
certificates conftest.py makes) placed before the real one."""

import asyncio
import ssl
import struct
import threading
import time
import uuid

import pytest
from conftest import free_ports

import custody
from custody import errors, kdf, wire
from custody.failover import (
    FAILOVER_BACKOFF_FIRST_S,
    FAILOVER_BACKOFF_MAX_S,
    Endpoints,
    format_endpoint,
    parse_endpoints,
)

PATH = "m/44'/0'/0'/0'/7"

# ------------------------------------------------------------------ the pure part


def test_endpoints_are_parsed_from_a_string_a_list_or_one_address():
    assert parse_endpoints("a:1") == [("a", 1)]
    assert parse_endpoints(("a", 1)) == [("a", 1)]
    assert parse_endpoints("a:1, b:2,") == [("a", 1), ("b", 2)]
    assert parse_endpoints(["a:1", ("b", 2), "[::1]:3", "a:1"]) == [("a", 1), ("b", 2), ("::1", 3)]
    assert format_endpoint(("::1", 3)) == "[::1]:3" and format_endpoint(("a", 1)) == "a:1"
    for bad in ["", "a", "a:b", [], ","]:
        with pytest.raises(ValueError):
            parse_endpoints(bad)


def test_the_next_endpoint_is_the_next_in_order_with_backoff_between_rounds():
    e = Endpoints(["a:1", "b:2", "c:3"])
    assert e.endpoint == ("a", 1)
    delays = []
    for expected in [("b", 2), ("c", 3), ("a", 1)] * 6:
        delays.append(e.failed(e.endpoint))
        assert e.endpoint == expected
    # 0 within a round; after each round the backoff, doubling up to the longest.
    assert delays[:3] == [0.0, 0.0, FAILOVER_BACKOFF_FIRST_S]
    assert delays[5] == 2 * FAILOVER_BACKOFF_FIRST_S
    rounds = delays[2::3]
    assert rounds == sorted(rounds) and rounds[-1] == FAILOVER_BACKOFF_MAX_S
    e.succeeded(("b", 2))
    assert e.endpoint == ("b", 2)
    assert [e.failed(e.endpoint) for _ in range(3)] == [0.0, 0.0, FAILOVER_BACKOFF_FIRST_S], "a success starts over"


def test_the_active_a_standby_names_is_tried_next_when_it_is_an_endpoint():
    e = Endpoints(["a:1", "b:2", "c:3"])
    assert e.failed(("a", 1), active="c:3") == 0.0
    assert e.endpoint == ("c", 3)
    # An active outside the list, naming itself, or not an address: the next in order.
    e.failed(("c", 3), active="elsewhere:9")
    assert e.endpoint == ("a", 1)
    e.failed(("a", 1), active="a:1")
    assert e.endpoint == ("b", 2)
    e.failed(("b", 2), active="not an address")
    assert e.endpoint == ("c", 3)


def test_a_report_about_an_endpoint_no_longer_in_use_changes_nothing():
    e = Endpoints(["a:1", "b:2"])
    e.failed(("a", 1))  # a thousand pipelined NOT_ACTIVE replies from a: one move
    for _ in range(1000):
        assert e.failed(("a", 1), active="a:1") == 0.0
    assert e.endpoint == ("b", 2) and e.failures == 1
    assert e.failed(("z", 9)) == 0.0 and e.endpoint == ("b", 2)


def test_rounds_that_find_no_appliance_give_up_and_a_standby_resets_the_count():
    e = Endpoints(["a:1", "b:2"])
    e.failed(e.endpoint, unreachable=True)
    assert not e.gave_up(1)
    e.failed(e.endpoint, unreachable=True)
    assert e.gave_up(1) and not e.gave_up(2)
    e.failed(e.endpoint, active=None)  # someone answered NOT_ACTIVE: a takeover is under way
    assert not e.gave_up(1)


# ------------------------------------------------------------ fake appliances


def hello_body() -> bytes:
    return struct.pack(">HBHBIIH", 0, 3, 1, 1, 16384, 1024, 0)


def seal_body() -> bytes:
    reason = b"fake"
    return (
        struct.pack(">HBBBBB", 0, int(wire.SealState.UNSEALED), int(wire.SealProvider.DEV), 0, 0, 0)
        + bytes(48)
        + bytes(16)
        + struct.pack(">H", len(reason))
        + reason
    )


class FakeAppliance:
    """A TLS listener with the development server certificate that answers by a rule:
    ``answer(opcode, body) -> reply body``, or None to close the connection there. It
    records every request (opcode) it read."""

    def __init__(self, certs: str, answer) -> None:
        self.answer = answer
        self.requests = []
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self.ctx.load_cert_chain(certs + "/server.pem", certs + "/server.key")
        self.ctx.load_verify_locations(certs + "/ca.pem")
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.server = None
        self.addr = None

    async def start(self) -> "FakeAppliance":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ctx)
        self.addr = "127.0.0.1:%d" % self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader, writer) -> None:
        try:
            while True:
                header = await reader.readexactly(wire.HEADER_LEN)
                _, _, opcode, _, request_id, body_len = struct.unpack(">4sBBHQI", header)
                body = await reader.readexactly(body_len)
                self.requests.append(opcode)
                reply = self.answer(opcode, body)
                if reply is None:
                    break
                writer.write(wire.frame(opcode | 0x80, request_id, reply))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


def standby(active):
    """Every request but the seal ones answered NOT_ACTIVE naming `active`."""

    def answer(opcode, body):
        if opcode == wire.Op.SEAL_STATUS:
            return seal_body()
        return wire.error_body(wire.NOT_ACTIVE, "this appliance is a standby", 0, active)

    return answer


def dead_address() -> str:
    return "127.0.0.1:%d" % free_ports(1)


def registered(appliance) -> str:
    a = str(uuid.uuid4())
    with custody.connect(appliance.addr, certs=appliance.certs) as c:
        c.register(a)
    return a


def test_a_standby_first_in_the_list_sends_the_client_to_the_active_it_names(appliance):
    a = registered(appliance)

    async def run():
        fake = await FakeAppliance(appliance.certs, standby(appliance.addr)).start()
        try:
            # The standby names the active: the dead endpoint between them is skipped.
            endpoints = [fake.addr, dead_address(), appliance.addr]
            c = await custody.AsyncClient.connect(endpoints, certs=appliance.certs)
            async with c:
                assert c.endpoint == custody.failover.split_address(appliance.addr)
                d = await c.derive(a, PATH)
                assert d.key == kdf.derive(appliance.seed(), a, 0, PATH)
            assert fake.requests == [wire.Op.HELLO]
        finally:
            await fake.stop()

    asyncio.run(run())


def test_the_synchronous_and_sharded_clients_take_a_comma_separated_list(appliance):
    a = registered(appliance)

    async def start():
        return await FakeAppliance(appliance.certs, standby(None)).start()

    loop = asyncio.new_event_loop()
    fake = loop.run_until_complete(start())
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        # The standby does not know the active: the next endpoint in order.
        with custody.connect(fake.addr + "," + appliance.addr, certs=appliance.certs, sharded=True) as c:
            assert c.derive(a, PATH).key == kdf.derive(appliance.seed(), a, 0, PATH)
            assert c._inner.is_shard_aware()
    finally:
        asyncio.run_coroutine_threadsafe(fake.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)
        loop.close()


def test_a_request_refused_not_active_is_sent_again_to_the_active(appliance):
    a = registered(appliance)

    def lost_its_lease(opcode, body):
        # Answers HELLO as an active would, then refuses the request NOT_ACTIVE.
        if opcode == wire.Op.HELLO:
            return hello_body()
        return wire.error_body(wire.NOT_ACTIVE, "the lease was lost", 0, appliance.addr)

    async def run():
        fake = await FakeAppliance(appliance.certs, lost_its_lease).start()
        try:
            c = await custody.AsyncClient.connect([fake.addr, appliance.addr], certs=appliance.certs)
            async with c:
                assert c.endpoint == custody.failover.split_address(fake.addr)
                keys = await asyncio.gather(*(c.derive(a, "m/44'/0'/0'/0'/%d" % i) for i in range(20)))
                assert [k.key for k in keys] == [kdf.derive(appliance.seed(), a, 0, "m/44'/0'/0'/0'/%d" % i) for i in range(20)]
                assert c.endpoint == custody.failover.split_address(appliance.addr)
            assert fake.requests[0] == wire.Op.HELLO and set(fake.requests[1:]) == {wire.Op.DERIVE}
        finally:
            await fake.stop()

    asyncio.run(run())


def close_on_first_request(active):
    """HELLO answered; the first other request read, then the connection closed; from
    then on a standby naming `active` (an active that died and came back)."""
    state = {}

    def answer(opcode, body):
        if state.get("closed"):
            return wire.error_body(wire.NOT_ACTIVE, "standby now", 0, active)
        if opcode == wire.Op.HELLO:
            return hello_body()
        state["closed"] = True
        return None

    return answer


def test_a_request_in_flight_when_the_connection_closes_is_outcome_unknown(appliance):
    a = registered(appliance)

    async def run():
        fake = await FakeAppliance(appliance.certs, close_on_first_request(appliance.addr)).start()
        c = await custody.AsyncClient.connect([fake.addr, appliance.addr], certs=appliance.certs)
        async with c:
            with pytest.raises(errors.OutcomeUnknown) as e:
                await c.derive(a, PATH)
            assert isinstance(e.value, errors.ConnectionClosed)
            assert (e.value.endpoint, e.value.opcode) == (fake.addr, wire.Op.DERIVE)
            assert fake.requests == [wire.Op.HELLO, wire.Op.DERIVE], "never sent again"
            # The next call finds the real appliance.
            assert (await c.derive(a, PATH)).key == kdf.derive(appliance.seed(), a, 0, PATH)
            assert fake.requests == [wire.Op.HELLO, wire.Op.DERIVE, wire.Op.HELLO]
        await fake.stop()

    asyncio.run(run())


def test_a_rotate_with_retry_unknown_is_sent_again_with_its_rotation_id(appliance):
    a = registered(appliance)
    rotation = uuid.uuid4()

    async def run():
        fake = await FakeAppliance(appliance.certs, close_on_first_request(appliance.addr)).start()
        c = await custody.AsyncClient.connect([fake.addr, appliance.addr], certs=appliance.certs)
        async with c:
            r = await c.rotate(a, rotation, retry_unknown=True)
            assert (r.rotation_id, r.counter, r.replayed) == (rotation, 1, False)
            assert fake.requests == [wire.Op.HELLO, wire.Op.ROTATE, wire.Op.HELLO]
        await fake.stop()

    asyncio.run(run())


def test_the_deadline_bounds_the_search_for_the_active(appliance):
    async def run():
        fake = await FakeAppliance(appliance.certs, standby(None)).start()
        try:
            t0 = time.monotonic()
            with pytest.raises(errors.NotActive) as e:
                await custody.AsyncClient.connect([fake.addr, dead_address()], certs=appliance.certs, deadline_s=0.5)
            took = time.monotonic() - t0
            assert 0.1 < took < 3, took  # no wait that would end past the deadline is begun
            assert e.value.active is None and e.value.status == 35
            assert len(fake.requests) > 2, "tried again with backoff"
        finally:
            await fake.stop()

    asyncio.run(run())


def test_no_appliance_at_any_endpoint_is_unreachable_at_once(appliance):
    async def run():
        t0 = time.monotonic()
        with pytest.raises(errors.Unreachable):
            await custody.AsyncClient.connect([dead_address(), dead_address()], certs=appliance.certs)
        assert time.monotonic() - t0 < 2

    asyncio.run(run())


def test_a_single_standby_endpoint_still_answers_the_seal_requests(appliance):
    async def run():
        fake = await FakeAppliance(appliance.certs, standby("elsewhere:7443")).start()
        try:
            c = await custody.AsyncClient.connect(fake.addr, certs=appliance.certs, deadline_s=0.3)
            async with c:
                assert (await c.seal_status()).state == custody.SealState.UNSEALED
                with pytest.raises(errors.NotActive) as e:
                    await c.status(uuid.uuid4())
                assert e.value.active == "elsewhere:7443"
        finally:
            await fake.stop()

    asyncio.run(run())


def test_the_sharded_client_opens_the_new_actives_shard_ports_after_a_failover(appliance):
    a = registered(appliance)

    def lost_its_lease(opcode, body):
        if opcode == wire.Op.HELLO:
            return hello_body()  # no shard ports
        return wire.error_body(wire.NOT_ACTIVE, "the lease was lost", 0, appliance.addr)

    async def run():
        fake = await FakeAppliance(appliance.certs, lost_its_lease).start()
        try:
            c = await custody.connect_async([fake.addr, appliance.addr], certs=appliance.certs, sharded=True)
            async with c:
                assert not c.is_shard_aware()
                first = await c.derive(a, PATH)  # refused NOT_ACTIVE, sent again through main
                assert c.main.endpoint == custody.failover.split_address(appliance.addr)
                second = await c.derive(a, PATH)  # main moved: the active's shard ports
                assert c.is_shard_aware()
                shard = custody.shard_of(a, 2)
                assert c.for_asset(a).port == appliance.shard_base + shard
                assert first.key == second.key == kdf.derive(appliance.seed(), a, 0, PATH)
        finally:
            await fake.stop()

    asyncio.run(run())
