"""The one error type of everything the coordinator refuses: `CoordinatorError(message, reason=, code=)`.

`reason` is a label of coordinator.validation.REASONS: the durable rejection log, the
Prometheus counter and the dashboard count refusals by it (`validation.reason_of` reads it).
`code` names the gRPC status the servicer (coordinator.server) aborts with. Subclasses set
both as class attributes (coordinator.rounds.RoundError and its kin, UploadRejected); a raise
site may override either, e.g. `WrongRound(msg, reason="replay")` for a stale nonce.
"""
from __future__ import annotations


class CoordinatorError(Exception):
    """A refused request: `reason` (a REASONS label) and `code` (a grpc.StatusCode name)."""

    reason: str = "other"
    code: str = "FAILED_PRECONDITION"

    def __init__(self, message: str = "", *, reason: str | None = None, code: str | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        if code is not None:
            self.code = code


class UploadRejected(CoordinatorError, ValueError):
    """An upload or request is malformed: size, checksum, shapes, non-finite values, norm, plan."""

    reason = "malformed"
    code = "INVALID_ARGUMENT"


class UploadTooLarge(UploadRejected):
    """An upload (or secure-aggregation message) over its size cap."""

    reason = "too_large"
    code = "RESOURCE_EXHAUSTED"
