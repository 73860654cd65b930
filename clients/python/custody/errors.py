"""Every way a call can fail, as exceptions.

- :class:`Refused`: the appliance answered the request with a status other than OK. One
  subclass per status (``custody.errors.InvalidPath``, ``RateLimited``, …), grouped under
  :class:`InvalidRequest`, :class:`StateRefused`, :class:`Retryable`, :class:`Forbidden`
  and the others below, each carrying ``status`` (the number), ``status_name``,
  ``message`` and ``retry_after_ms``.
- :class:`ProtocolError`: bytes from the appliance that are not a valid v3 frame or reply.
- :class:`ConnectionClosed`: the connection ended before the reply came; the request's
  outcome is unknown (a DERIVE may be retried: it is a new audited derivation; a ROTATE is
  safe to retry with the same rotation id).
"""

from __future__ import annotations

from typing import Dict, Type

from .wire import STATUSES, ProtocolError  # noqa: F401  (re-exported)


class CustodyError(Exception):
    """Base of every error this client raises (ProtocolError aside, which is the wire's)."""


class ConnectionClosed(CustodyError):
    """The connection closed before the reply arrived: the outcome is unknown."""

    outcome_unknown = True


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
    if status in (30, 31, 32, 33, 41):
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
    else:
        _cls = type(_cls_name, (_base,), {"__doc__": "Status %s (%d)." % (_name, _number), "status": _number})
        globals()[_cls_name] = _cls
    BY_STATUS[_number] = _cls


def refusal(status: int, message: str, retry_after_ms: int = 0, opcode: int = 0) -> Refused:
    """The exception for a refusal with this status (a status this client does not know
    is a plain Refused)."""
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
    "PolicyRefused",
    "ProtocolError",
    "Refused",
    "Retryable",
    "SealRefused",
    "StateRefused",
    "refusal",
] + [c.__name__ for c in BY_STATUS.values()]
