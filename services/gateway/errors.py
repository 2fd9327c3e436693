"""Domain errors of the gateway; server.py maps each to one gRPC status code, in one place.

Messages are written for the person calling the API: they say what was wrong and what is allowed.
Unauthenticated and PermissionDenied are services/auth.py's, shared with the job service.
"""


class GatewayError(Exception):
    """Base of errors a caller caused or can act on."""


class InvalidArgument(GatewayError):
    pass


class NotFound(GatewayError):
    pass


class ResourceExhausted(GatewayError):
    pass


class DeadlineExceeded(GatewayError):
    pass


class Unavailable(GatewayError):
    pass


class FailedPrecondition(GatewayError):
    """The request does not fit the world's current state (e.g. an expected_step that is not next)."""


class Aborted(GatewayError):
    """Another gateway changed the world at the same time; nothing was applied by this call."""

