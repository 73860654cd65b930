"""custody: a Python client for the custody key-custody appliance (protocol v3,
docs/protocol.md), standard library only.

    import custody
    c = custody.connect("127.0.0.1:7443", certs="./dev/certs")
    key = c.derive("0b9f3c5e-8d1a-4f6b-9c2d-3e4f5a6b7c8d", "m/44'/0'/0'/0'/7").key

asyncio: ``await custody.connect_async(...)`` gives an AsyncClient (``sharded=True``: a
ShardedClient); concurrent calls are pipelined on the connection.

Several appliances (one active, standbys answering NOT_ACTIVE): give every endpoint,
``custody.connect("a:7443,b:7443", ...)`` or a list; the client finds the active and
follows it (custody.failover), raising NotActive past its deadline and OutcomeUnknown for
a request in flight when its connection closed.
"""

from . import errors, failover, kdf, wire
from .client import AsyncClient, Client, ShardedClient, TlsFiles, connect, connect_async
from .errors import (
    ConnectionClosed,
    ConnectionLimit,
    CustodyError,
    Forbidden,
    FramingRefused,
    InternalError,
    InvalidRequest,
    NotActive,
    OutcomeUnknown,
    PolicyRefused,
    Refused,
    Retryable,
    SealRefused,
    StateRefused,
    Unreachable,
)
from .wire import (
    AssetInfo,
    AssetPage,
    ListedAsset,
    AssetState,
    Derived,
    Hello,
    Proof,
    ProtocolError,
    Purpose,
    Receipt,
    Reconciled,
    Rotated,
    SealInfo,
    SealState,
    Verdict,
    shard_of,
)

__version__ = "0.1.0"

__all__ = [
    "AssetInfo",
    "AssetPage",
    "ListedAsset",
    "AssetState",
    "AsyncClient",
    "Client",
    "ConnectionClosed",
    "ConnectionLimit",
    "CustodyError",
    "Derived",
    "Forbidden",
    "FramingRefused",
    "Hello",
    "InternalError",
    "InvalidRequest",
    "NotActive",
    "OutcomeUnknown",
    "PolicyRefused",
    "Proof",
    "ProtocolError",
    "Purpose",
    "Receipt",
    "Reconciled",
    "Refused",
    "Retryable",
    "Rotated",
    "SealInfo",
    "SealRefused",
    "SealState",
    "ShardedClient",
    "StateRefused",
    "TlsFiles",
    "Unreachable",
    "Verdict",
    "connect",
    "connect_async",
    "errors",
    "failover",
    "kdf",
    "shard_of",
    "wire",
]
