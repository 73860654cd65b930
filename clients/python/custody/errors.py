"""Every way a call can fail, as exceptions.

- :class:`Refused`: the appliance answered the request with a status other than OK. One
  subclass per status (``custody.errors.InvalidPath``, ``RateLimited``, …), grouped under
  :class:`InvalidRequest`, :class:`StateRefused`, :class:`Retryable`, :class:`Forbidden`
  and the others below, each carrying ``status`` (the number), ``status_name``,
  ``message`` and ``retry_after_ms``.
- :class:`ProtocolError`: bytes from the appliance that are not a valid v3 frame or reply.
- :class:`NotActive` (a :class:`Retryable`): the appliance is a standby (status 35); the
  request was not run. ``active`` names the active appliance (``host:port``) when the
  standby knows it. The client resends such a request to the next endpoint by itself; it
  raises NotActive only when its deadline passed without finding the active.
- :class:`OutcomeUnknown` (a :class:`ConnectionClosed`): the connection closed while the
  request was in flight, so it may or may not have run; ``endpoint`` and ``opcode`` say
  where and what. Never resent silently: a DERIVE sent again is a new audited derivation;
  a ROTATE is safe to send again with the same rotation id (``rotate(...,
  retry_unknown=True)``).
- :class:`ConnectionClosed`: the connection ended (or this client was closed).
"""

from __future__ import annotations

from typing import Dict, Optional, Type

from .wire import STATUSES, Op, ProtocolError  # noqa: F401  (re-exported)


class CustodyError(Exception):
    """Base of every error this client raises (ProtocolError aside, which is the wire's)."""


class ConnectionClosed(CustodyError):
    """The connection closed (or this client was closed) before the reply arrived."""

    outcome_unknown = True


class OutcomeUnknown(ConnectionClosed):
    """The connection closed while the request was in flight: it may or may not have run.

    ``endpoint`` is the appliance it was sent to (``host:port``), ``opcode`` the request's
    opcode (``custody.wire.Op``). The client never sends it again by itself: check (STATUS,
    the audit log) or send it again knowingly — a DERIVE sent again is a new audited
    derivation; a ROTATE with the same rotation id is answered with the first result if it
    had run (``rotate(..., retry_unknown=True)`` does that)."""

    def __init__(self, endpoint: str, opcode: int, detail: str = "") -> None:
        self.endpoint = endpoint
        self.opcode = opcode
        try:
            what = Op(opcode).name
        except ValueError:
            what = "opcode %#04x" % opcode
        text = "the connection to %s closed while %s was in flight: it may or may not have run" % (endpoint, what)
        if detail:
            text += " (%s)" % detail
        super().__init__(text)


class Unreachable(CustodyError):
    """No connection could be made (refused, timed out, TLS handshake failed): nothing
    was sent."""


class Refused(CustodyError):
    """The appliance refused the request; nothing changed in its store."""

    status: int = -1

    def __init__(self, status: int, message: str, retry_after_ms: int = 0, opcode: int = 0) -> None:
        self.status = status
        self.status_name = STATUSES.get(status, "UNKNOWN_STATUS_%d" % status)
        self.message = message
        self.retry_after_ms = retry_after_ms
        self.opcode = opcode
        text = "%s (%d): %s" % (self.status_name, status, message)
        if retry_after_ms:
            text += " (retry after %d ms)" % retry_after_ms
        super().__init__(text)


class FramingRefused(Refused):
    """The appliance could not read a frame (1, 2, 3, 6) and closed the connection."""


class InvalidRequest(Refused):
    """A field or body the appliance refused (4, 5, 10-15): fix the request."""


class StateRefused(Refused):
    """The asset's or region's state does not allow it (16, 20-27)."""


class Retryable(Refused):
    """A bound, the store, the seal or a drain (30-33, 41): retry after retry_after_ms."""


class NotActive(Retryable):
    """The appliance is a standby (35): it acknowledges nothing, and the request was not
    run. ``active`` is the active appliance's client address (``host:port``) when the
    standby knows it, else None. The client sends the request to the next endpoint (the
    named active first, when it is one of them) by itself; this is raised only when its
    deadline passed without finding the active: add the active's address to the
    endpoints, or retry later."""

    status = 35

    def __init__(
        self, status: int, message: str, retry_after_ms: int = 0, opcode: int = 0, active: Optional[str] = None
    ) -> None:
        self.active = active
        super().__init__(status, message, retry_after_ms, opcode)
        if active:
            self.args = ("%s (active: %s)" % (self.args[0], active),)


class ConnectionLimit(Refused):
    """The connection would exceed a connection bound (34); it was closed."""


class Forbidden(Refused):
    """The requester lacks the role, purpose, region or asset group (40)."""


class InternalError(Refused):
    """The appliance failed internally (50): report it."""


class SealRefused(Refused):
    """UNSEAL refused a share (60-63)."""


class PolicyRefused(Refused):
    """POLICY_RELOAD refused (70-71)."""


def _family(status: int) -> Type[Refused]:
    if status in (1, 2, 3, 6):
        return FramingRefused
    if status in (4, 5) or 10 <= status <= 15:
        return InvalidRequest
    if status == 16 or 20 <= status <= 27:
        return StateRefused
    if status in (30, 31, 32, 33, 35, 41):
        return Retryable
    if status == 34:
        return ConnectionLimit
    if status == 40:
        return Forbidden
    if 60 <= status <= 63:
        return SealRefused
    if 70 <= status <= 71:
        return PolicyRefused
    return InternalError if status == 50 else Refused


def _class_name(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


#: status number -> its exception class.
BY_STATUS: Dict[int, Type[Refused]] = {}
for _number, _name in STATUSES.items():
    if _number == 0:
        continue
    _base = _family(_number)
    _cls_name = _class_name(_name)
    if _cls_name == _base.__name__:
        _cls = _base
    elif _cls_name in globals():
        _cls = globals()[_cls_name]  # written out above (NotActive: it carries more)
    else:
        _cls = type(_cls_name, (_base,), {"__doc__": "Status %s (%d)." % (_name, _number), "status": _number})
        globals()[_cls_name] = _cls
    BY_STATUS[_number] = _cls


def refusal(status: int, message: str, retry_after_ms: int = 0, opcode: int = 0, active: Optional[str] = None) -> Refused:
    """The exception for a refusal with this status (a status this client does not know
    is a plain Refused); ``active`` is NOT_ACTIVE's."""
    if status == NotActive.status:
        return NotActive(status, message, retry_after_ms, opcode, active)
    return BY_STATUS.get(status, _family(status))(status, message, retry_after_ms, opcode)


__all__ = [
    "BY_STATUS",
    "ConnectionClosed",
    "ConnectionLimit",
    "CustodyError",
    "Unreachable",
    "Forbidden",
    "FramingRefused",
    "InternalError",
    "InvalidRequest",
    "NotActive",
    "OutcomeUnknown",
    "PolicyRefused",
    "ProtocolError",
    "Refused",
    "Retryable",
    "SealRefused",
    "StateRefused",
    "refusal",
]
__all__ += [n for n in dict.fromkeys(c.__name__ for c in BY_STATUS.values()) if n not in __all__]
