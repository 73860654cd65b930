"""Which appliance to try next (issue 19: one active, the others standbys answering
NOT_ACTIVE), without sockets or clocks: the client tells :class:`Endpoints` what each
attempt gave, and it answers which endpoint is next and how long to wait first."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

#: Backoff between rounds (a round: as many failed attempts as there are endpoints since
#: the last success): the first wait, doubled each round up to the longest.
FAILOVER_BACKOFF_FIRST_S = 0.02
FAILOVER_BACKOFF_MAX_S = 0.5

#: How long one call may spend finding the active (connecting, standbys' NOT_ACTIVE
#: answers, resends, backoff) before it raises the last failure. A takeover needs the
#: lease (2 s by default) to run out, then a few seconds at most.
FAILOVER_DEADLINE_S = 10.0

#: Rounds in a row in which every attempt found no appliance at all (refused, timed out,
#: closed) before a call gives up, deadline or not: 1 for the first connection (a wrong
#: address is reported at once), then this many (the client's reconnect attempts).
RECONNECT_ROUNDS = 5

Endpoint = Tuple[str, int]
Address = Union[str, Endpoint]


def split_address(address: Address) -> Endpoint:
    """``"host:port"`` (``"[::1]:7443"`` for IPv6) or ``(host, port)`` -> ``(host, port)``."""
    if isinstance(address, tuple):
        host, port = address
        return str(host), int(port)
    address = address.strip()
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError("an address is HOST:PORT, not %r" % address)
    return host.strip("[]"), int(port)


def parse_endpoints(address: Union[Address, Sequence[Address]]) -> List[Endpoint]:
    """One address, a comma-separated list of them (``"a:7443,b:7443"``), or a sequence of
    addresses (``["a:7443", ("b", 7443)]``), in order, without repeats."""
    if isinstance(address, str):
        items: Sequence[Address] = [a for a in address.split(",") if a.strip()]
    elif isinstance(address, tuple) and len(address) == 2 and isinstance(address[1], int):
        items = [address]
    else:
        items = list(address)
    out: List[Endpoint] = []
    for item in items:
        endpoint = split_address(item)
        if endpoint not in out:
            out.append(endpoint)
    if not out:
        raise ValueError("no endpoint given")
    return out


def format_endpoint(endpoint: Endpoint) -> str:
    host, port = endpoint
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


class Endpoints:
    """The endpoints in the order given, the one in use (``endpoint``), and what to do
    after a failure.

    - :meth:`succeeded`: an attempt found the active; failures and backoff start over.
    - :meth:`failed`: the endpoint is not the active (it answered NOT_ACTIVE, or could
      not be reached, or its connection closed). The next endpoint is the active it named
      when that is one of the endpoints (and not itself), else the next in order. It
      returns the seconds to wait before trying it: 0 within a round, the backoff after
      each round. A report about an endpoint that is no longer the one in use (another
      caller already moved on) changes nothing and waits 0.
    - :meth:`gave_up`: whether ``rounds`` rounds in a row found no appliance at all.
    """

    def __init__(self, endpoints: Sequence[Address]) -> None:
        self.endpoints: List[Endpoint] = parse_endpoints(endpoints)
        self.current = 0
        self.failures = 0
        self.unreachable_streak = 0
        self.backoff_s = FAILOVER_BACKOFF_FIRST_S

    def __len__(self) -> int:
        return len(self.endpoints)

    @property
    def endpoint(self) -> Endpoint:
        return self.endpoints[self.current]

    def index(self, address: Optional[Address]) -> Optional[int]:
        """The position of an address among the endpoints, or None (also for an address
        that does not parse)."""
        if not address:
            return None
        try:
            endpoint = split_address(address)
        except ValueError:
            return None
        try:
            return self.endpoints.index(endpoint)
        except ValueError:
            return None

    def succeeded(self, endpoint: Endpoint) -> None:
        i = self.index(endpoint)
        if i is not None:
            self.current = i
        self.failures = 0
        self.unreachable_streak = 0
        self.backoff_s = FAILOVER_BACKOFF_FIRST_S

    def failed(self, endpoint: Endpoint, *, active: Optional[str] = None, unreachable: bool = False) -> float:
        i = self.index(endpoint)
        if i is None or i != self.current:
            return 0.0
        self.failures += 1
        self.unreachable_streak = self.unreachable_streak + 1 if unreachable else 0
        named = self.index(active)
        self.current = named if named is not None and named != i else (i + 1) % len(self.endpoints)
        if self.failures % len(self.endpoints):
            return 0.0
        delay = self.backoff_s
        self.backoff_s = min(self.backoff_s * 2, FAILOVER_BACKOFF_MAX_S)
        return delay

    def gave_up(self, rounds: int) -> bool:
        return self.unreachable_streak >= rounds * len(self.endpoints)
