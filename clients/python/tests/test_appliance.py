"""Against a real appliance (`custodyd dev`, started by conftest.py): every operation,
every class of refusal, 10,000 pipelined derivations checked key by key, the shard-aware
client, and a reconnect after the appliance restarts."""

import asyncio
import random
import uuid

import pytest
from test_wire import openssl_kdf, require_openssl

import custody
from custody import errors, kdf

PATH = "m/44'/0'/0'/0'/7"


def new_asset() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def client(appliance):
    c = custody.connect(appliance.addr, certs=appliance.certs)
    yield c
    c.close()


def test_every_operation(client, appliance):
    hello = client.hello()
    assert hello.version == 3 and hello.shard_count == 2
    assert hello.shard_ports == [appliance.shard_base, appliance.shard_base + 1]

    a = new_asset()
    info = client.register(a)
    assert (str(info.asset), info.state, info.counter) == (a, custody.AssetState.ACTIVE, 0)
    assert info.shard == custody.shard_of(a, hello.shard_count)
    with pytest.raises(errors.AssetExists):
        client.register(a)

    d = client.derive(a, PATH, region="EU-WEST", purpose="SETTLEMENT", ttl_s=60)
    assert d.counter == 0 and d.scheme_version == 1
    assert d.key == kdf.derive(appliance.seed(), a, 0, PATH)
    assert client.prove(d.receipt).verdict in (custody.Verdict.PROVEN, custody.Verdict.UNAUTHENTICATED)

    rotation = uuid.uuid4()
    r = client.rotate(a, rotation)
    assert (r.counter, r.previous_counter, r.replayed) == (1, 0, False)
    again = client.rotate(a, rotation)
    assert (again.counter, again.replayed) == (1, True), "the same rotation id answers the first result"
    with pytest.raises(errors.CounterMismatch):
        client.rotate(a, expected_counter=0)
    assert client.rotate(a, expected_counter=1).counter == 2
    assert client.derive(a, PATH).key == kdf.derive(appliance.seed(), a, 2, PATH)

    assert client.suspend(a).state == custody.AssetState.SUSPENDED
    with pytest.raises(errors.AssetSuspended):
        client.derive(a, PATH)
    with pytest.raises(errors.InvalidTransition):
        client.suspend(a)
    assert client.resume(a).state == custody.AssetState.ACTIVE

    assert ("APAC", True) in client.regions()
    assert ("APAC", False) in client.set_region("APAC", False)
    with pytest.raises(errors.RegionDisabled):
        client.derive(a, PATH, region="APAC")
    assert ("APAC", True) in client.set_region("APAC", True)

    assert client.seal_status().state == custody.SealState.UNSEALED
    assert client.policy_reload().generation >= 2
    rec = client.reconcile(full=True)
    assert rec.findings_total == 0 and rec.records_checked > 0 and rec.macs_checked

    assert client.retire(a).state == custody.AssetState.RETIRED
    with pytest.raises(errors.AssetRetired):
        client.derive(a, PATH)
    assert client.status(a).state == custody.AssetState.RETIRED


def test_seal_and_unseal(client, appliance):
    a = new_asset()
    client.register(a)
    assert client.seal().state == custody.SealState.SEALED_BY_OPERATOR
    with pytest.raises(errors.Sealed) as e:
        client.derive(a, PATH)
    assert isinstance(e.value, errors.Retryable)
    client.unseal()  # the dev provider unseals at once when asked
    for _ in range(100):
        if client.seal_status().state == custody.SealState.UNSEALED:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert client.derive(a, PATH).key == kdf.derive(appliance.seed(), a, 0, PATH)


@pytest.mark.parametrize(
    "call, refusal",
    [
        (lambda c, a: c.derive(a, "m/44'/0'/0'/0"), errors.InvalidPath),
        (lambda c, a: c.derive(a, PATH, ttl_s=5), errors.InvalidTtl),
        (lambda c, a: c.derive(a, PATH, region="MARS"), errors.InvalidRegion),
        (lambda c, a: c.derive(a, PATH, purpose=9), errors.InvalidPurpose),
        (lambda c, a: c.derive("00000000-0000-0000-0000-000000000000", PATH), errors.InvalidAssetId),
        (lambda c, a: c.derive(new_asset(), PATH), errors.UnknownAsset),
        (lambda c, a: c.rotate(a, "00000000-0000-0000-0000-000000000000"), errors.InvalidRotationId),
    ],
)
def test_each_bad_request_is_refused_with_its_status(client, call, refusal):
    a = new_asset()
    client.register(a)
    with pytest.raises(refusal) as e:
        call(client, a)
    assert e.value.status == refusal.status and e.value.status_name and e.value.message
    assert client.status(a).counter == 0, "a refusal changes nothing"


def test_an_identity_without_a_role_is_forbidden(appliance):
    with custody.connect(appliance.addr, **appliance.nobody()) as c:
        assert c.hello().version == 3  # HELLO needs no role
        with pytest.raises(errors.Forbidden) as e:
            c.derive(new_asset(), PATH)
        assert e.value.status == 40 and "no role" in e.value.message


def test_the_rate_limit_says_when_to_retry(client):
    a = new_asset()
    client.register(a)
    # 1000/1s per requester and asset: a burst of 1,000, then one a millisecond.
    results = client.derive_many([(a, PATH)] * 1500)
    limited = [r for r in results if isinstance(r, errors.RateLimited)]
    assert limited, "the burst past the rate limit is refused"
    assert all(r.retry_after_ms > 0 and r.status == 41 for r in limited)
    assert sum(isinstance(r, custody.Derived) for r in results) >= 1000


def test_ten_thousand_pipelined_derivations_each_key_checked(client, appliance):
    seed = appliance.seed()
    assets = [new_asset() for _ in range(50)]
    for a in assets:
        client.register(a)
    asks = [(assets[i % 50], "m/44'/0'/%d'/0'/%d" % (i % 7, i)) for i in range(10_000)]
    results = client.derive_many(asks)
    refused = [r for r in results if not isinstance(r, custody.Derived)]
    assert not refused, refused[:3]
    for (a, path), d in zip(asks, results):
        assert d.key == kdf.derive(seed, a, 0, path), (a, path)
    # And a sample against OpenSSL, the independent implementation.
    require_openssl()
    for (a, path), d in random.Random(7).sample(list(zip(asks, results)), 20):
        assert openssl_kdf(seed, a, 0, path) == d.key.hex()


def test_the_sharded_client_sends_each_asset_to_its_owner(appliance):
    async def run():
        c = await custody.connect_async(appliance.addr, certs=appliance.certs, sharded=True)
        async with c:
            assert c.is_shard_aware()
            assets = [new_asset() for _ in range(20)]
            infos = await asyncio.gather(*(c.register(a) for a in assets))
            for a, info in zip(assets, infos):
                assert c.for_asset(a).port == appliance.shard_base + info.shard
            keys = await asyncio.gather(*(c.derive(a, PATH) for a in assets))
            assert [k.key for k in keys] == [kdf.derive(appliance.seed(), a, 0, PATH) for a in assets]

    asyncio.run(run())


def test_pipelined_replies_are_matched_by_request_id(appliance):
    async def run():
        c = await custody.connect_async(appliance.addr, certs=appliance.certs)
        async with c:
            a = new_asset()
            await c.register(a)
            # Immediate refusals and HELLOs overtake derivations: each caller still gets its own.
            calls = []
            for i in range(300):
                calls.append(c.derive(a, "m/44'/0'/0'/0'/%d" % i))
                calls.append(c.derive(a, "bad"))
                calls.append(c.hello())
            out = await asyncio.gather(*calls, return_exceptions=True)
            for i in range(300):
                assert out[3 * i].key == kdf.derive(appliance.seed(), a, 0, "m/44'/0'/0'/0'/%d" % i)
                assert isinstance(out[3 * i + 1], errors.InvalidPath)
                assert out[3 * i + 2].version == 3

    asyncio.run(run())


def test_a_framing_error_and_a_closed_connection_are_distinct(appliance):
    async def run():
        c = await custody.connect_async(appliance.addr, certs=appliance.certs)
        async with c:
            await c.hello()
            proto = c._proto
            proto.transport.write(b"XSTD" + bytes(16))  # bad magic: the appliance closes
            with pytest.raises(errors.MalformedFrame) as e:
                await c.hello()
            assert isinstance(e.value, errors.FramingRefused)
            # The next call connects again.
            assert (await c.hello()).version == 3

    asyncio.run(run())


def test_the_client_reconnects_after_the_appliance_restarts(appliance):
    async def run():
        c = await custody.connect_async(appliance.addr, certs=appliance.certs)
        async with c:
            a = new_asset()
            await c.register(a)
            assert appliance.stop() == 0
            with pytest.raises((errors.ConnectionClosed, errors.ShuttingDown, errors.Unreachable)):
                await c.derive(a, PATH)
            appliance.start()
            # The state directory is kept: the asset and its keys are the same.
            d = await c.derive(a, PATH)
            assert d.key == kdf.derive(appliance.seed(), a, 0, PATH)

    asyncio.run(run())


def test_register_many_reports_each_asset(client):
    fresh = [new_asset() for _ in range(200)]
    client.register(fresh[0])
    results = client.register_many(fresh + ["00000000-0000-0000-0000-000000000000"])
    assert isinstance(results[0], errors.AssetExists)
    assert all(isinstance(r, custody.AssetInfo) and r.counter == 0 for r in results[1:-1])
    assert isinstance(results[-1], errors.InvalidAssetId)


def test_the_assets_are_listed_page_by_page_with_their_state(client):
    mine = sorted(new_asset() for _ in range(30))
    client.register_many(mine)
    client.suspend(mine[3])
    every = client.assets()
    ids = [str(a.asset) for a in every]
    assert ids == sorted(ids), "in asset id order"
    listed = {str(a.asset): a for a in every}
    assert all(a in listed for a in mine)
    assert listed[mine[3]].state == custody.AssetState.SUSPENDED
    assert listed[mine[0]].shard == custody.shard_of(mine[0], 2)
    assert listed[mine[0]].changed_unix_ms > 1_700_000_000_000
    suspended = [str(a.asset) for a in client.assets(state="SUSPENDED")]
    assert mine[3] in suspended and mine[4] not in suspended
    # Small pages walk the same list.
    walked, after = [], None
    while True:
        page = client.list_assets(after=after, limit=7)
        assert len(page.assets) <= 7
        walked += [str(a.asset) for a in page.assets]
        if not page.more:
            break
        after = page.assets[-1].asset
    assert walked == ids
    with pytest.raises(ValueError):
        client.list_assets(limit=0)


def test_listing_needs_a_role(appliance):
    with custody.connect(appliance.addr, **appliance.nobody()) as c:
        with pytest.raises(errors.Forbidden):
            c.list_assets()


def test_a_caller_that_gives_up_keeps_its_slot_until_the_reply(appliance):
    async def run():
        c = await custody.connect_async(appliance.addr, certs=appliance.certs)
        async with c:
            a = new_asset()
            await c.register(a)
            window = c._window
            free = window._value
            # Give up on 50 derivations at once; their replies still come.
            for _ in range(50):
                t = asyncio.ensure_future(c.derive(a, PATH))
                await asyncio.sleep(0)
                t.cancel()
            await asyncio.sleep(0.5)
            assert window._value == free, "every slot came back with its reply"
            assert (await c.derive(a, PATH)).key == kdf.derive(appliance.seed(), a, 0, PATH)

    asyncio.run(run())
