"""asyncio clients: one connection to the active appliance (:class:`AsyncClient`, which
finds it among several endpoints and follows it when it moves), shard-aware routing over
the per-shard ports HELLO announces (:class:`ShardedClient`), and a small synchronous
wrapper (:class:`Client`)."""

from __future__ import annotations

import asyncio
import os
import ssl
import struct
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from . import wire
from .errors import (
    ConnectionClosed,
    CustodyError,
    NotActive,
    OutcomeUnknown,
    ProtocolError,
    Refused,
    Unreachable,
    refusal,
)
from .failover import (
    FAILOVER_BACKOFF_FIRST_S,
    FAILOVER_BACKOFF_MAX_S,
    FAILOVER_DEADLINE_S,
    RECONNECT_ROUNDS,
    Address,
    Endpoint,
    Endpoints,
    format_endpoint,
    parse_endpoints,
    split_address,
)
from .wire import AssetId, Op, Purpose

#: DERIVE's defaults, as the CLI's (`custody derive`).
DEFAULT_REGION = "US-EAST"
DEFAULT_PURPOSE = Purpose.TRADING
DEFAULT_TTL_S = 300

#: How long connecting (TCP and the TLS handshake) and the HELLO after it may take, with
#: one endpoint; with several, an endpoint that does not answer within the shorter
#: bound is passed over for the next.
CONNECT_TIMEOUT_S = 10.0
FAILOVER_CONNECT_TIMEOUT_S = 2.0

#: Bytes of requests buffered before a pipelining caller waits for the socket.
WRITE_HIGH_WATER = 256 * 1024

#: Reconnect attempts (rounds over the endpoints) after a closed connection, and the
#: first and longest backoff between them (custody.failover).
RECONNECT_ATTEMPTS = RECONNECT_ROUNDS
RECONNECT_BACKOFF_S = (FAILOVER_BACKOFF_FIRST_S, FAILOVER_BACKOFF_MAX_S)

#: The requests a standby answers itself (protocol.md §5, NOT_ACTIVE): a client with a
#: single endpoint sends them to it even when it is a standby.
STANDBY_OPCODES = frozenset({Op.SEAL, Op.UNSEAL, Op.SEAL_STATUS})

#: Anything an AsyncClient.connect accepts as its address: "host:port", "a:7443,b:7443",
#: (host, port), or a sequence of these.
Addresses = Union[Address, Sequence[Address]]


@dataclass(frozen=True)
class TlsFiles:
    """Mutual TLS from PEM files: the CA that issued the appliance's certificate, and
    this client's certificate and key."""

    ca: str
    cert: str
    key: str
    server_name: str = "localhost"

    @classmethod
    def from_certs_dir(cls, directory: str, server_name: str = "localhost") -> "TlsFiles":
        """The `custody dev-certs` / `custody --certs DIR` layout: ca.pem, client.pem,
        client.key."""
        return cls(
            os.path.join(directory, "ca.pem"),
            os.path.join(directory, "client.pem"),
            os.path.join(directory, "client.key"),
            server_name,
        )

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


def _tls(
    certs: Optional[str], ca: Optional[str], cert: Optional[str], key: Optional[str], server_name: str
) -> TlsFiles:
    if certs is not None:
        return TlsFiles.from_certs_dir(certs, server_name)
    if ca is None or cert is None or key is None:
        raise ValueError("give certs=DIR, or ca=, cert= and key=")
    return TlsFiles(ca, cert, key, server_name)


_split = split_address


class _NotSent(Exception):
    """The connection had closed before the request was written: it was not sent."""


class _Protocol(asyncio.Protocol):
    """One TLS connection: frames out, replies matched to their callers by request id."""

    def __init__(self, endpoint: Endpoint, on_lost: Callable[["_Protocol"], None]) -> None:
        self.endpoint = endpoint
        self.transport: Optional[asyncio.Transport] = None
        self.reader = wire.FrameReader()
        #: request id -> (the caller's future, what to call once the request is settled:
        #: its in-flight slot, given back even if the caller gave up; its opcode).
        self.pending: Dict[int, Tuple[asyncio.Future, Optional[Callable[[], None]], int]] = {}
        self.closed: Optional[CustodyError] = None
        #: No new request goes on a retired connection (its appliance answered NOT_ACTIVE);
        #: it closes once the requests still on it are answered.
        self.retired = False
        #: HELLO was answered NOT_ACTIVE: only STANDBY_OPCODES go on it.
        self.standby = False
        self._on_lost = on_lost
        self._writable: Optional[asyncio.Future] = None

    def usable(self, opcode: int) -> bool:
        return self.closed is None and not self.retired and (not self.standby or opcode in STANDBY_OPCODES)

    def retire(self) -> None:
        self.retired = True
        if not self.pending and self.transport is not None:
            self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        try:
            for opcode, request_id, body in self.reader.feed(data):
                self._reply(opcode, request_id, body)
        except ProtocolError as e:
            self._fail(e)
            if self.transport is not None:
                self.transport.close()

    def _reply(self, opcode: int, request_id: int, body: bytes) -> None:
        entry = self.pending.pop(request_id, None) if request_id != 0 else None
        if entry is None:
            if request_id == 0:
                # A refusal of the connection (CONNECTION_LIMIT, opcode 0x80) or of a frame
                # the appliance could not name (MALFORMED_FRAME, …): it closes the
                # connection, and every request in flight fails with it.
                e = wire.decode_error(body)
                self._fail(refusal(e.status, e.message, e.retry_after_ms, opcode, e.active))
                return
            raise ProtocolError("a reply to request %d, which is not pending" % request_id)
        future, settled, _ = entry
        if not future.done():
            future.set_result(body)
        if settled is not None:
            settled()
        if self.retired and not self.pending and self.transport is not None:
            self.transport.close()

    def _fail(self, error: CustodyError) -> None:
        if self.closed is None:
            self.closed = error
        pending, self.pending = self.pending, {}
        for future, settled, opcode in pending.values():
            if not future.done():
                if isinstance(self.closed, ConnectionClosed):
                    # Sent, not answered: it may or may not have run.
                    future.set_exception(OutcomeUnknown(format_endpoint(self.endpoint), opcode, str(self.closed)))
                else:
                    future.set_exception(self.closed)
            if settled is not None:
                settled()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._fail(ConnectionClosed("the connection closed%s" % (": %s" % exc if exc else "")))
        self._on_lost(self)

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    async def writable(self) -> None:
        if self._writable is not None:
            await self._writable

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class AsyncClient:
    """One connection to the active appliance. Calls may run concurrently (pipelined):
    each gets its own request id and is answered by id, in whatever order replies come.

    With several endpoints (one active appliance, the others standbys answering
    NOT_ACTIVE), the client finds the active: it tries the endpoints in order, moving on
    after NOT_ACTIVE (to the active it names first, when that is one of the endpoints) or
    a connection that fails, with backoff between rounds (custody.failover), within
    ``deadline_s`` per call. A request refused NOT_ACTIVE was not run: it is sent again to
    the active, transparently. A request in flight when its connection closed raises
    OutcomeUnknown (never sent again by itself: ``rotate(..., retry_unknown=True)`` does
    for a ROTATE). After the connection closes, the next call connects again."""

    def __init__(
        self,
        host: Optional[str],
        port: Optional[int],
        tls: TlsFiles,
        reconnect: bool = True,
        *,
        endpoints: Optional[Addresses] = None,
        deadline_s: float = FAILOVER_DEADLINE_S,
    ) -> None:
        if endpoints is None:
            if host is None or port is None:
                raise ValueError("give host and port, or endpoints")
            endpoints = [(host, port)]
        self._endpoints = Endpoints(parse_endpoints(endpoints))
        self.tls = tls
        self.reconnect = reconnect
        self.deadline_s = deadline_s
        self._ctx = tls.context()
        self._proto: Optional[_Protocol] = None
        self._connecting: Optional[asyncio.Future] = None
        self._next_id = 1
        self._closed = False
        #: Connections made (a HELLO answered OK); the ShardedClient follows it.
        self.generation = 0
        #: The appliance's HELLO, asked on every (re)connect.
        self.hello_info: Optional[wire.Hello] = None
        # Requests in flight stay within the appliance's max_inflight_per_connection
        # (HELLO's), so that a pipelining caller is never refused BUSY for it.
        self._window: Optional[asyncio.Semaphore] = None

    @property
    def endpoints(self) -> List[Endpoint]:
        """Every endpoint, in the order given."""
        return list(self._endpoints.endpoints)

    @property
    def endpoint(self) -> Endpoint:
        """The endpoint in use (or tried next): the active, once found."""
        proto = self._proto
        return proto.endpoint if proto is not None and proto.closed is None else self._endpoints.endpoint

    @property
    def host(self) -> str:
        return self.endpoint[0]

    @property
    def port(self) -> int:
        return self.endpoint[1]

    @classmethod
    async def connect(
        cls,
        address: Addresses,
        *,
        certs: Optional[str] = None,
        ca: Optional[str] = None,
        cert: Optional[str] = None,
        key: Optional[str] = None,
        server_name: str = "localhost",
        reconnect: bool = True,
        deadline_s: float = FAILOVER_DEADLINE_S,
    ) -> "AsyncClient":
        """Connects to the active among the endpoints: ``"host:port"``, ``"a:7443,b:7443"``,
        ``(host, port)`` or a list of these. Every appliance's certificate must carry
        ``server_name``."""
        client = cls(
            None, None, _tls(certs, ca, cert, key, server_name), reconnect, endpoints=address, deadline_s=deadline_s
        )
        # A single endpoint may be a standby: connected all the same (SEAL, UNSEAL and
        # SEAL_STATUS are its to answer; other calls wait for it to take over, within the
        # deadline). Among several, the active is found.
        deadline = asyncio.get_running_loop().time() + deadline_s
        await client._connection(Op.HELLO, deadline, first=True, standby_ok=len(client._endpoints) == 1)
        return client

    def _sibling(self, endpoint: Endpoint, deadline_s: float) -> "AsyncClient":
        """Another client with the same TLS files, to one endpoint (a shard's port)."""
        return AsyncClient(None, None, self.tls, self.reconnect, endpoints=[endpoint], deadline_s=deadline_s)

    async def _open(self, endpoint: Endpoint) -> _Protocol:
        loop = asyncio.get_running_loop()

        def lost(p: _Protocol) -> None:
            if self._proto is p:
                self._proto = None

        timeout = CONNECT_TIMEOUT_S if len(self._endpoints) == 1 else FAILOVER_CONNECT_TIMEOUT_S
        _, proto = await asyncio.wait_for(
            loop.create_connection(
                lambda: _Protocol(endpoint, lost),
                endpoint[0],
                endpoint[1],
                ssl=self._ctx,
                server_hostname=self.tls.server_name,
            ),
            timeout,
        )
        return proto

    async def _connection(self, opcode: int, deadline: float, first: bool = False, standby_ok: bool = False) -> _Protocol:
        """A connection a request with this opcode may go on: the one in use, or a new
        one to the active (a standby, for STANDBY_OPCODES with a single endpoint)."""
        while True:
            proto = self._proto
            if proto is not None and proto.usable(opcode):
                return proto
            if self._closed:
                raise ConnectionClosed("this client was closed")
            if self._connecting is None:
                break
            # Another caller is connecting: its connection serves this one too.
            await asyncio.shield(self._connecting)
        if proto is not None and proto.closed is None and not proto.retired:
            proto.retire()  # a standby's connection, and this request needs the active
        self._connecting = asyncio.get_running_loop().create_future()
        try:
            accept_standby = len(self._endpoints) == 1 and (standby_ok or opcode in STANDBY_OPCODES)
            proto, hello = await self._find(deadline, accept_standby, first)
            if hello is not None:
                if self._window is None:
                    # One window for the client's life (a reconnect to an appliance with
                    # another bound keeps the first: a smaller bound then answers BUSY).
                    self._window = asyncio.Semaphore(max(1, hello.max_inflight_per_connection))
                self.hello_info = hello
                self.generation += 1
            self._proto = proto
            self._connecting.set_result(proto)
            return proto
        except asyncio.CancelledError:
            # The other callers waiting for this connection are not cancelled: they see
            # a closed connection.
            self._connecting.set_exception(ConnectionClosed("connecting was cancelled"))
            self._connecting.exception()
            raise
        except BaseException as e:
            self._connecting.set_exception(e)
            # Retrieved here so that a connect nobody else awaited is not reported.
            self._connecting.exception()
            raise
        finally:
            self._connecting = None

    async def _find(self, deadline: float, accept_standby: bool, first: bool) -> Tuple[_Protocol, Optional[wire.Hello]]:
        """Tries the endpoints (custody.failover.Endpoints says which, and how long to
        wait) until one answers HELLO: the active. Gives up with the last failure past the
        deadline (a standby's NotActive, when one answered), or after rounds in a row that
        found no appliance at all (one for the first connection, RECONNECT_ATTEMPTS
        after: Unreachable)."""
        loop = asyncio.get_running_loop()
        rounds = 1 if first or not self.reconnect else RECONNECT_ATTEMPTS
        # Past the deadline, a standby's NOT_ACTIVE says more than a dead endpoint does.
        not_active: Optional[NotActive] = None
        while True:
            endpoint = self._endpoints.endpoint
            active: Optional[str] = None
            unreachable = False
            last: CustodyError
            try:
                proto = await self._open(endpoint)
            except (OSError, asyncio.TimeoutError) as e:
                last = Unreachable("cannot connect to %s: %s" % (format_endpoint(endpoint), e or type(e).__name__))
                last.__cause__ = e
                unreachable = True
            else:
                try:
                    hello_body = await asyncio.wait_for(self._send(proto, Op.HELLO, b""), CONNECT_TIMEOUT_S)
                    hello = wire.decode_hello(hello_body)
                except NotActive as e:
                    if accept_standby:
                        proto.standby = True
                        return proto, None
                    proto.close()
                    last = not_active = e
                    active = e.active
                except (ConnectionClosed, _NotSent, asyncio.TimeoutError) as e:
                    proto.close()
                    last = Unreachable("%s did not answer HELLO: %s" % (format_endpoint(endpoint), e or type(e).__name__))
                    unreachable = True
                except BaseException:
                    proto.close()
                    raise
                else:
                    self._endpoints.succeeded(endpoint)
                    return proto, hello
            delay = self._endpoints.failed(endpoint, active=active, unreachable=unreachable)
            if self._endpoints.gave_up(rounds):
                raise last
            if loop.time() + delay > deadline:
                raise not_active or last
            await asyncio.sleep(delay)

    async def close(self) -> None:
        self._closed = True
        proto = self._proto
        if proto is not None:
            proto.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # ------------------------------------------------------------------ the call

    async def call(self, opcode: int, body: bytes = b"", *, retry_unknown: bool = False) -> bytes:
        """Sends one request to the active and returns its OK reply body; raises the
        refusal. NOT_ACTIVE (not run) sends it again to the next endpoint, within the
        deadline; OutcomeUnknown (in flight when the connection closed) is raised, or,
        with retry_unknown (for requests safe to repeat), sent again."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline_s
        while True:
            proto = self._proto
            if proto is None or not proto.usable(opcode):
                proto = await self._connection(opcode, deadline)
            # HELLO is never counted in flight by the appliance, so not by the window
            # either; a standby's connection (no HELLO) has none yet.
            window = self._window if opcode != Op.HELLO else None
            if window is not None:
                await window.acquire()
                if not proto.usable(opcode):
                    window.release()
                    continue
            try:
                # The slot is the appliance's in-flight count: it is given back when the
                # reply (or the connection's end) settles the request, even if this
                # caller gave up.
                return await self._send(proto, opcode, body, on_settled=window.release if window else None)
            except _NotSent:
                if loop.time() > deadline:
                    raise ConnectionClosed("the connection closed before the request was sent") from None
            except NotActive as e:
                # Not run: this appliance is not (or no longer) the active.
                proto.retire()
                delay = self._endpoints.failed(proto.endpoint, active=e.active)
                if loop.time() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
            except OutcomeUnknown:
                if not retry_unknown or loop.time() > deadline:
                    raise

    async def _send(
        self, proto: _Protocol, opcode: int, body: bytes, on_settled: Optional[Callable[[], None]] = None
    ) -> bytes:
        if proto.closed is not None:
            if on_settled is not None:
                on_settled()
            raise _NotSent()
        request_id = self._next_id
        self._next_id = request_id + 1 if request_id < 0xFFFFFFFFFFFFFFFF else 1
        future = asyncio.get_running_loop().create_future()
        # A caller that gives up cancels only its future: the entry stays until the
        # reply (or the connection's end) settles the request and gives its slot back.
        proto.pending[request_id] = (future, on_settled, opcode)
        assert proto.transport is not None
        proto.transport.write(wire.frame(opcode, request_id, body))
        if proto._writable is not None:
            await proto.writable()
        reply = await future
        if reply[:2] == b"\x00\x00":
            return reply
        e = wire.decode_error(reply)
        raise refusal(e.status, e.message, e.retry_after_ms, opcode, e.active)

    # ----------------------------------------------------------- the operations

    async def hello(self) -> wire.Hello:
        """The appliance's protocol figures and shard ports; also the keep-alive."""
        return wire.decode_hello(await self.call(Op.HELLO))

    async def register(self, asset: AssetId) -> wire.AssetInfo:
        return wire.decode_asset(await self.call(Op.REGISTER, wire.asset_bytes(asset)))

    async def status(self, asset: AssetId) -> wire.AssetInfo:
        return wire.decode_asset(await self.call(Op.STATUS, wire.asset_bytes(asset)))

    async def derive(
        self,
        asset: AssetId,
        path: str,
        *,
        region: str = DEFAULT_REGION,
        purpose: Union[Purpose, int, str] = DEFAULT_PURPOSE,
        ttl_s: int = DEFAULT_TTL_S,
    ) -> wire.Derived:
        body = wire.derive_body(asset, path, region, purpose, ttl_s)
        return wire.decode_derived(await self.call(Op.DERIVE, body))

    async def rotate(
        self,
        asset: AssetId,
        rotation_id: Optional[AssetId] = None,
        *,
        expected_counter: Optional[int] = None,
        retry_unknown: bool = False,
    ) -> wire.Rotated:
        """Moves the counter forward by one. Pass the same rotation_id to retry safely (a
        new one is made when none is given; it is in the reply). With retry_unknown, a
        ROTATE whose connection closed while it was in flight (OutcomeUnknown) is sent
        again with the same rotation id, within the deadline: if the first had run, the
        appliance answers its result again (``replayed``)."""
        rotation = rotation_id if rotation_id is not None else uuid.uuid4()
        body = wire.rotate_body(asset, rotation, expected_counter)
        return wire.decode_rotated(await self.call(Op.ROTATE, body, retry_unknown=retry_unknown))

    async def suspend(self, asset: AssetId) -> wire.AssetInfo:
        return wire.decode_asset(await self.call(Op.SUSPEND, wire.asset_bytes(asset)))

    async def resume(self, asset: AssetId) -> wire.AssetInfo:
        return wire.decode_asset(await self.call(Op.RESUME, wire.asset_bytes(asset)))

    async def retire(self, asset: AssetId) -> wire.AssetInfo:
        return wire.decode_asset(await self.call(Op.RETIRE, wire.asset_bytes(asset)))

    async def regions(self) -> List[Tuple[str, bool]]:
        return wire.decode_regions(await self.call(Op.REGIONS))

    async def set_region(self, region: str, enabled: bool) -> List[Tuple[str, bool]]:
        return wire.decode_regions(await self.call(Op.SET_REGION, wire.set_region_body(region, enabled)))

    async def seal_status(self) -> wire.SealInfo:
        return wire.decode_seal(await self.call(Op.SEAL_STATUS))

    async def seal(self) -> wire.SealInfo:
        return wire.decode_seal(await self.call(Op.SEAL))

    async def unseal(self, share: str = "", *, reset: bool = False) -> wire.SealInfo:
        return wire.decode_seal(await self.call(Op.UNSEAL, wire.unseal_body(share, reset)))

    async def policy_reload(self) -> wire.PolicyReloaded:
        return wire.decode_policy(await self.call(Op.POLICY_RELOAD))

    async def reconcile(self, full: bool = False) -> wire.Reconciled:
        return wire.decode_reconciled(await self.call(Op.RECONCILE, bytes([1 if full else 0])))

    async def list_assets(
        self,
        state: Optional[Union[wire.AssetState, int, str]] = None,
        after: Optional[AssetId] = None,
        limit: int = wire.LIST_ASSETS_PAGE_MAX,
    ) -> wire.AssetPage:
        """One page of the registered assets after `after` (None: the first page), in
        `state` if given, in asset id order, as the store holds them."""
        body = wire.list_assets_body(state, after, limit)
        return wire.decode_asset_page(await self.call(Op.LIST_ASSETS, body))

    async def assets(self, state: Optional[Union[wire.AssetState, int, str]] = None) -> List[wire.ListedAsset]:
        """Every registered asset (in `state` if given), page by page."""
        out: List[wire.ListedAsset] = []
        after: Optional[AssetId] = None
        while True:
            page = await self.list_assets(state, after)
            out.extend(page.assets)
            if not page.more or not page.assets:
                return out
            after = page.assets[-1].asset

    async def prove(self, receipt: wire.Receipt) -> wire.Proof:
        body = wire.prove_body(receipt.shard, receipt.seq, receipt.hash)
        return wire.decode_proof(await self.call(Op.PROVE_RECEIPT, body))


class ShardedClient:
    """Sends each request about an asset to the port of the shard that owns it (HELLO's
    shard ports, protocol.md §4.1 and §9), so that the appliance never hands it to
    another core; the rest go to the shared port. Without shard ports it is one
    connection.

    With several endpoints, the shared port's client (``main``) finds the active and
    follows it; the shard ports are the active's. A request a shard's port could not
    take (NOT_ACTIVE, or no connection: not run) goes through ``main``, and once ``main``
    is connected to another appliance the shard ports are opened again on it."""

    def __init__(self, main: AsyncClient, hello: wire.Hello, shards: List[AsyncClient]) -> None:
        self.main = main
        self.hello_info = hello
        self.shards = shards
        #: Several endpoints: the shard clients fail fast and hand over to main.
        self.failover = len(main.endpoints) > 1
        self._shards_generation = main.generation
        self._shards_endpoint = main.endpoint
        self._reopening: Optional[asyncio.Future] = None

    @classmethod
    async def connect(cls, address: Addresses, **kw: Any) -> "ShardedClient":
        main = await AsyncClient.connect(address, **kw)
        try:
            hello = main.hello_info if main.hello_info is not None else await main.hello()
            shards = await cls._open_shards(main, hello)
        except BaseException:
            await main.close()
            raise
        return cls(main, hello, shards)

    @staticmethod
    async def _open_shards(main: AsyncClient, hello: wire.Hello) -> List[AsyncClient]:
        if not hello.shard_ports:
            return []
        # With several endpoints a shard's client makes one attempt (deadline 0): main
        # does the failing over.
        deadline_s = 0.0 if len(main.endpoints) > 1 else main.deadline_s
        clients = [main._sibling((main.host, port), deadline_s) for port in hello.shard_ports]
        deadline = asyncio.get_running_loop().time() + deadline_s
        opened = await asyncio.gather(
            *(c._connection(Op.HELLO, deadline, first=True) for c in clients), return_exceptions=True
        )
        failures = [o for o in opened if isinstance(o, BaseException)]
        if failures:
            for c in clients:
                await c.close()
            raise failures[0]
        return clients

    def is_shard_aware(self) -> bool:
        return bool(self.shards)

    def for_asset(self, asset: AssetId) -> AsyncClient:
        if not self.shards:
            return self.main
        return self.shards[wire.shard_of(asset, self.hello_info.shard_count)]

    async def _follow_main(self) -> None:
        """After main connected again to another appliance: that one's shard ports, once
        per main connection (a failure leaves the requests on main until its next)."""
        if self.main.generation == self._shards_generation:
            return
        if self._reopening is not None:
            await asyncio.shield(self._reopening)
            return
        self._reopening = asyncio.get_running_loop().create_future()
        try:
            generation, endpoint, hello = self.main.generation, self.main.endpoint, self.main.hello_info
            if endpoint != self._shards_endpoint or not self.shards:
                old, self.shards = self.shards, []
                for c in old:
                    await c.close()
                if hello is not None:
                    try:
                        self.shards = await self._open_shards(self.main, hello)
                    except (CustodyError, ProtocolError):
                        self.shards = []
                    self.hello_info = hello
            self._shards_generation, self._shards_endpoint = generation, endpoint
        finally:
            self._reopening.set_result(None)
            self._reopening = None

    async def _routed(self, name: str, asset: AssetId, *args: Any, **kw: Any) -> Any:
        if not self.failover:
            return await getattr(self.for_asset(asset), name)(asset, *args, **kw)
        await self._follow_main()
        target = self.for_asset(asset)
        if target is not self.main:
            try:
                return await getattr(target, name)(asset, *args, **kw)
            except (NotActive, Unreachable):
                pass  # not run: main finds the active
            except OutcomeUnknown:
                if not kw.get("retry_unknown"):
                    raise
        return await getattr(self.main, name)(asset, *args, **kw)

    async def close(self) -> None:
        for c in [self.main, *self.shards]:
            await c.close()

    async def __aenter__(self) -> "ShardedClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def hello(self) -> wire.Hello:
        return await self.main.hello()

    def __getattr__(self, name: str) -> Any:
        # Asset operations go to the owner's port; the others to the shared port.
        if name in _ASSET_OPERATIONS:
            def routed(asset: AssetId, *args: Any, **kw: Any) -> Any:
                return self._routed(name, asset, *args, **kw)

            return routed
        if name in _APPLIANCE_OPERATIONS:
            return getattr(self.main, name)
        raise AttributeError(name)


_ASSET_OPERATIONS = frozenset({"register", "status", "derive", "rotate", "suspend", "resume", "retire"})
_APPLIANCE_OPERATIONS = frozenset(
    {
        "regions",
        "set_region",
        "seal_status",
        "seal",
        "unseal",
        "policy_reload",
        "reconcile",
        "prove",
        "list_assets",
        "assets",
    }
)


class Client:
    """The synchronous client: each method runs the asyncio one on a loop of its own.
    `derive_many` pipelines a batch."""

    def __init__(self, inner: Union[AsyncClient, ShardedClient], loop: asyncio.AbstractEventLoop) -> None:
        self._inner = inner
        self._loop = loop

    @classmethod
    def connect(cls, address: Addresses, *, sharded: bool = False, **kw: Any) -> "Client":
        loop = asyncio.new_event_loop()
        try:
            opener = ShardedClient.connect if sharded else AsyncClient.connect
            inner = loop.run_until_complete(opener(address, **kw))
        except BaseException:
            loop.close()
            raise
        return cls(inner, loop)

    def _run(self, coroutine: Any) -> Any:
        return self._loop.run_until_complete(coroutine)

    def close(self) -> None:
        if not self._loop.is_closed():
            self._run(self._inner.close())
            # Let the transports finish closing.
            self._run(asyncio.sleep(0))
            self._loop.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def derive_many(
        self, requests: Iterable[Tuple[AssetId, str]], **kw: Any
    ) -> List[Union[wire.Derived, Refused]]:
        """Derives every (asset, path) pipelined; each result is the Derived or the
        refusal, in the order asked."""

        async def all_of() -> List[Any]:
            calls = [self._inner.derive(a, p, **kw) for a, p in requests]
            return await asyncio.gather(*calls, return_exceptions=True)

        results = self._run(all_of())
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, Refused):
                raise r
        return results

    def register_many(self, assets: Iterable[AssetId]) -> List[Union[wire.AssetInfo, Refused]]:
        """Registers every asset pipelined; each result is the AssetInfo or the refusal
        (AssetExists for one already registered, InvalidAssetId, …), in the order given."""

        async def all_of() -> List[Any]:
            return await asyncio.gather(*(self._inner.register(a) for a in assets), return_exceptions=True)

        results = self._run(all_of())
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, Refused):
                raise r
        return results

    def __getattr__(self, name: str) -> Any:
        if name in _ASSET_OPERATIONS or name in _APPLIANCE_OPERATIONS or name == "hello":
            method = getattr(self._inner, name)

            def sync(*args: Any, **kw: Any) -> Any:
                return self._run(method(*args, **kw))

            sync.__name__ = name
            sync.__doc__ = method.__doc__
            return sync
        raise AttributeError(name)


def connect(address: Addresses = "127.0.0.1:7443", **kw: Any) -> Client:
    """A synchronous client: ``custody.connect("127.0.0.1:7443", certs="./dev/certs")``;
    several endpoints (``"a:7443,b:7443"`` or a list) to find the active among them.
    Keyword arguments: certs (a `custody --certs` directory) or ca, cert and key (PEM
    files); server_name (default localhost); sharded (route by HELLO's shard ports);
    deadline_s (per call, to find the active; default 10); reconnect."""
    return Client.connect(address, **kw)


async def connect_async(address: Addresses = "127.0.0.1:7443", *, sharded: bool = False, **kw: Any):
    """An AsyncClient (or, with sharded=True, a ShardedClient)."""
    if sharded:
        return await ShardedClient.connect(address, **kw)
    return await AsyncClient.connect(address, **kw)
