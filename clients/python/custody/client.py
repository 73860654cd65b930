"""asyncio clients: one connection (:class:`AsyncClient`), shard-aware routing over the
per-shard ports HELLO announces (:class:`ShardedClient`), and a small synchronous wrapper
(:class:`Client`)."""

from __future__ import annotations

import asyncio
import os
import ssl
import struct
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from . import wire
from .errors import ConnectionClosed, CustodyError, ProtocolError, Refused, Unreachable, refusal
from .wire import AssetId, Op, Purpose

#: DERIVE's defaults, as the CLI's (`custody derive`).
DEFAULT_REGION = "US-EAST"
DEFAULT_PURPOSE = Purpose.TRADING
DEFAULT_TTL_S = 300

#: How long connecting (TCP and the TLS handshake) may take.
CONNECT_TIMEOUT_S = 10.0

#: Bytes of requests buffered before a pipelining caller waits for the socket.
WRITE_HIGH_WATER = 256 * 1024

#: Reconnect attempts after a closed connection, and the first and longest backoff.
RECONNECT_ATTEMPTS = 5
RECONNECT_BACKOFF_S = (0.05, 2.0)


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


def _split(address: Union[str, Tuple[str, int]]) -> Tuple[str, int]:
    if isinstance(address, tuple):
        return address
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError("an address is HOST:PORT, not %r" % address)
    return host.strip("[]"), int(port)


class _Protocol(asyncio.Protocol):
    """One TLS connection: frames out, replies matched to their callers by request id."""

    def __init__(self, on_lost: Callable[["_Protocol"], None]) -> None:
        self.transport: Optional[asyncio.Transport] = None
        self.reader = wire.FrameReader()
        #: request id -> (the caller's future, what to call once the request is settled:
        #: its in-flight slot, given back even if the caller gave up).
        self.pending: Dict[int, Tuple[asyncio.Future, Optional[Callable[[], None]]]] = {}
        self.closed: Optional[CustodyError] = None
        self._on_lost = on_lost
        self._writable: Optional[asyncio.Future] = None

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
                self._fail(refusal(e.status, e.message, e.retry_after_ms, opcode))
                return
            raise ProtocolError("a reply to request %d, which is not pending" % request_id)
        future, settled = entry
        if not future.done():
            future.set_result(body)
        if settled is not None:
            settled()

    def _fail(self, error: CustodyError) -> None:
        if self.closed is None:
            self.closed = error
        pending, self.pending = self.pending, {}
        for future, settled in pending.values():
            if not future.done():
                future.set_exception(self.closed)
            if settled is not None:
                settled()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._fail(ConnectionClosed("the connection closed%s; the outcome of the requests in flight is unknown" % (": %s" % exc if exc else "")))
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


class AsyncClient:
    """One connection to an appliance. Calls may run concurrently (pipelined): each gets
    its own request id and is answered by id, in whatever order replies come. After the
    connection closes, the requests in flight fail with ConnectionClosed and the next call
    connects again (with backoff)."""

    def __init__(self, host: str, port: int, tls: TlsFiles, reconnect: bool = True) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.reconnect = reconnect
        self._ctx = tls.context()
        self._proto: Optional[_Protocol] = None
        self._connecting: Optional[asyncio.Future] = None
        self._next_id = 1
        self._closed = False
        #: The appliance's HELLO, asked on every (re)connect.
        self.hello_info: Optional[wire.Hello] = None
        # Requests in flight stay within the appliance's max_inflight_per_connection
        # (HELLO's), so that a pipelining caller is never refused BUSY for it.
        self._window: Optional[asyncio.Semaphore] = None

    @classmethod
    async def connect(
        cls,
        address: Union[str, Tuple[str, int]],
        *,
        certs: Optional[str] = None,
        ca: Optional[str] = None,
        cert: Optional[str] = None,
        key: Optional[str] = None,
        server_name: str = "localhost",
        reconnect: bool = True,
    ) -> "AsyncClient":
        host, port = _split(address)
        client = cls(host, port, _tls(certs, ca, cert, key, server_name), reconnect)
        await client._connection()
        return client

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()

        def lost(p: _Protocol) -> None:
            if self._proto is p:
                self._proto = None

        _, proto = await asyncio.wait_for(
            loop.create_connection(
                lambda: _Protocol(lost),
                self.host,
                self.port,
                ssl=self._ctx,
                server_hostname=self.tls.server_name,
            ),
            CONNECT_TIMEOUT_S,
        )
        return proto

    async def _connection(self) -> _Protocol:
        proto = self._proto
        if proto is not None and proto.closed is None:
            return proto
        if self._closed:
            raise ConnectionClosed("this client was closed")
        if self._connecting is not None:
            return await asyncio.shield(self._connecting)
        self._connecting = asyncio.get_running_loop().create_future()
        try:
            proto = await self._open_with_backoff(first=self._proto is None and self._next_id == 1)
            try:
                hello_body = await asyncio.wait_for(self._send(proto, Op.HELLO, b""), CONNECT_TIMEOUT_S)
                hello = wire.decode_hello(hello_body)
            except BaseException:
                if proto.transport is not None:
                    proto.transport.close()
                raise
            if self._window is None:
                # One window for the client's life (a reconnect to an appliance with
                # another bound keeps the first: a smaller bound then answers BUSY).
                self._window = asyncio.Semaphore(max(1, hello.max_inflight_per_connection))
            self.hello_info = hello
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

    async def _open_with_backoff(self, first: bool) -> _Protocol:
        attempts = 1 if first or not self.reconnect else RECONNECT_ATTEMPTS
        delay, longest = RECONNECT_BACKOFF_S
        for attempt in range(attempts):
            try:
                return await self._open()
            except (OSError, asyncio.TimeoutError) as e:
                if attempt + 1 == attempts:
                    raise Unreachable("cannot connect to %s:%d: %s" % (self.host, self.port, e)) from e
                await asyncio.sleep(delay)
                delay = min(delay * 2, longest)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self._closed = True
        proto = self._proto
        if proto is not None and proto.transport is not None:
            proto.transport.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # ------------------------------------------------------------------ the call

    async def call(self, opcode: int, body: bytes = b"") -> bytes:
        """Sends one request and returns its OK reply body; raises the refusal."""
        proto = self._proto
        if proto is None or proto.closed is not None:
            proto = await self._connection()
        if opcode == Op.HELLO:
            # Never counted in flight by the appliance, so not by the window either.
            return await self._send(proto, opcode, body)
        window = self._window
        assert window is not None
        await window.acquire()
        try:
            if proto.closed is not None:
                proto = await self._connection()
        except BaseException:
            window.release()
            raise
        # The slot is the appliance's in-flight count: it is given back when the reply
        # (or the connection's end) settles the request, even if this caller gave up.
        return await self._send(proto, opcode, body, on_settled=window.release)

    async def _send(
        self, proto: _Protocol, opcode: int, body: bytes, on_settled: Optional[Callable[[], None]] = None
    ) -> bytes:
        if proto.closed is not None:
            if on_settled is not None:
                on_settled()
            raise proto.closed
        request_id = self._next_id
        self._next_id = request_id + 1 if request_id < 0xFFFFFFFFFFFFFFFF else 1
        future = asyncio.get_running_loop().create_future()
        # A caller that gives up cancels only its future: the entry stays until the
        # reply (or the connection's end) settles the request and gives its slot back.
        proto.pending[request_id] = (future, on_settled)
        assert proto.transport is not None
        proto.transport.write(wire.frame(opcode, request_id, body))
        if proto._writable is not None:
            await proto.writable()
        reply = await future
        if reply[:2] == b"\x00\x00":
            return reply
        e = wire.decode_error(reply)
        raise refusal(e.status, e.message, e.retry_after_ms, opcode)

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
    ) -> wire.Rotated:
        """Moves the counter forward by one. Pass the same rotation_id to retry safely (a
        new one is made when none is given; it is in the reply)."""
        rotation = rotation_id if rotation_id is not None else uuid.uuid4()
        body = wire.rotate_body(asset, rotation, expected_counter)
        return wire.decode_rotated(await self.call(Op.ROTATE, body))

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
    connection."""

    def __init__(self, main: AsyncClient, hello: wire.Hello, shards: List[AsyncClient]) -> None:
        self.main = main
        self.hello_info = hello
        self.shards = shards

    @classmethod
    async def connect(cls, address: Union[str, Tuple[str, int]], **kw: Any) -> "ShardedClient":
        main = await AsyncClient.connect(address, **kw)
        hello = main.hello_info
        assert hello is not None
        shards: List[AsyncClient] = []
        if hello.shard_ports:
            opened = await asyncio.gather(
                *(AsyncClient.connect((main.host, port), **kw) for port in hello.shard_ports),
                return_exceptions=True,
            )
            failures = [o for o in opened if isinstance(o, BaseException)]
            if failures:
                for o in opened:
                    if isinstance(o, AsyncClient):
                        await o.close()
                await main.close()
                raise failures[0]
            shards = list(opened)  # type: ignore[arg-type]
        return cls(main, hello, shards)

    def is_shard_aware(self) -> bool:
        return bool(self.shards)

    def for_asset(self, asset: AssetId) -> AsyncClient:
        if not self.shards:
            return self.main
        return self.shards[wire.shard_of(asset, self.hello_info.shard_count)]

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
                return getattr(self.for_asset(asset), name)(asset, *args, **kw)

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
    def connect(cls, address: Union[str, Tuple[str, int]], *, sharded: bool = False, **kw: Any) -> "Client":
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


def connect(address: Union[str, Tuple[str, int]] = "127.0.0.1:7443", **kw: Any) -> Client:
    """A synchronous client: ``custody.connect("127.0.0.1:7443", certs="./dev/certs")``.
    Keyword arguments: certs (a `custody --certs` directory) or ca, cert and key (PEM
    files); server_name (default localhost); sharded (route by HELLO's shard ports)."""
    return Client.connect(address, **kw)


async def connect_async(address: Union[str, Tuple[str, int]] = "127.0.0.1:7443", *, sharded: bool = False, **kw: Any):
    """An AsyncClient (or, with sharded=True, a ShardedClient)."""
    if sharded:
        return await ShardedClient.connect(address, **kw)
    return await AsyncClient.connect(address, **kw)
