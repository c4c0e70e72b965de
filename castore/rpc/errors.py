"""CastoreError <-> gRPC status, both directions. The error's class name travels in trailing
metadata, so the client raises the same class the server did."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from castore import errors as E

_CODES: dict[type[E.CastoreError], grpc.StatusCode] = {
    E.NotFoundError: grpc.StatusCode.NOT_FOUND,
    E.IntegrityError: grpc.StatusCode.DATA_LOSS,
    E.NotEmptyError: grpc.StatusCode.FAILED_PRECONDITION,
    E.ExistsError: grpc.StatusCode.ALREADY_EXISTS,
    E.PathError: grpc.StatusCode.INVALID_ARGUMENT,
    E.StorageFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    E.PeerUnavailableError: grpc.StatusCode.UNAVAILABLE,
    E.UsageError: grpc.StatusCode.INVALID_ARGUMENT,
    E.ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    E.RepoError: grpc.StatusCode.FAILED_PRECONDITION,
}
_BY_NAME: dict[str, type[E.CastoreError]] = {
    c.__name__: c for c in vars(E).values()
    if isinstance(c, type) and issubclass(c, E.CastoreError)}
ERROR_KEY = "castore-error"


def status_for(exc: E.CastoreError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in _CODES:
            return _CODES[cls]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL


@contextmanager
def abort_on_error(context: grpc.ServicerContext) -> Iterator[None]:
    """Turn a CastoreError raised in a handler into the matching status (context.abort raises)."""
    try:
        yield
    except E.CastoreError as exc:
        context.set_trailing_metadata(((ERROR_KEY, type(exc).__name__),))
        context.abort(status_for(exc), str(exc))


def from_rpc_error(exc: grpc.RpcError, what: str) -> E.CastoreError:
    """The CastoreError for a failed call (raise it `from exc`)."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    name = ""
    for key, value in (exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else ():
        if key == ERROR_KEY:
            name = value if isinstance(value, str) else value.decode()
    cls = _BY_NAME.get(name)
    if cls is not None:
        return cls(details or what)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return E.PeerUnavailableError(f"{what}: the daemon did not answer in time")
    if code == grpc.StatusCode.UNAVAILABLE:
        return E.PeerUnavailableError(f"{what}: the daemon is not reachable ({details})")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        # a full disk is always tagged (abort_on_error); untagged, gRPC refused the size of a
        # message or the other side refused more work
        return E.LimitError(f"{what}: refused as over a limit ({details})")
    return E.CastoreError(f"{what} failed: {code.name if code else 'error'}: {details}")
