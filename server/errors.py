"""Domain errors of the serving core.

The data plane, scheduler and session store raise these; transports map them to their own codes
in one place (:mod:`server.servicer` for gRPC). Each message is meant for the client: it says what
was wrong and, for limits, which limit.
"""

from __future__ import annotations


class ServeError(Exception):
    """Base of every error a client may see."""


class NotFound(ServeError):
    """Unknown, closed or expired session."""


class InvalidArgument(ServeError):
    """Bad input: unknown token id, empty input, a value outside its range or over a limit."""


class Busy(ServeError):
    """The session is being used by another request."""


class AlreadyExists(ServeError):
    """A client-chosen session id is taken."""


class Aborted(ServeError):
    """Another replica advanced the session first; nothing was changed, a retry may succeed."""


class FailedPrecondition(ServeError):
    """The request cannot apply to the session as it is (a record written for another model)."""


class ResourceExhausted(ServeError):
    """The session table or a queue is full."""


class QuotaExceeded(ResourceExhausted, ServeError):
    """The caller's own limit is reached (``max_sessions_per_principal``): unlike a full queue,
    a retry does not help until the caller closes sessions (KServe answers RESOURCE_EXHAUSTED
    for it, UNAVAILABLE for a full queue). ``ServeError`` is named as a direct base so that
    :mod:`server.ipc` (which carries ``ServeError``'s direct subclasses by name) sends it from
    the engine to a front end as itself."""


class DeadlineExceeded(ServeError):
    """The client's deadline passed before the request could commit; nothing was changed."""


class Unauthenticated(ServeError):
    """No valid credential."""


class Unavailable(ServeError):
    """The server is loading or draining."""


class PermissionDenied(ServeError):
    """The caller is authenticated but may not do this (model control without admin rights)."""
