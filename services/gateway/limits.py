"""Input limits of the genie.v1 API, and quoting of caller input in error messages.

Every string a caller sends is checked here before it reaches the domain; messages quote at most
QUOTE_CHARS characters of it, so an oversized value can never blow up a status message.
"""

from __future__ import annotations

from services.gateway.errors import InvalidArgument

QUOTE_CHARS = 100
MAX_WORLD_ID_CHARS = 64  # ids are 32 hex characters; room for other id schemes, no more
MAX_MODEL_NAME_CHARS = 128


def quote(text: str, limit: int = QUOTE_CHARS) -> str:
    """repr() of text, cut to `limit` characters with a note of the full length."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def _check_string(field: str, value: str, limit: int, required: bool = True) -> str:
    if required and not value:
        raise InvalidArgument(f"{field} is empty: set it")
    if len(value) > limit:
        raise InvalidArgument(f"{field} is {len(value)} characters long; at most {limit} are allowed "
                              f"(got {quote(value)})")
    if not value.isprintable():
        raise InvalidArgument(f"{field} contains control characters: {quote(value)}")
    return value


def world_id(value: str) -> str:
    return _check_string("world_id", value, MAX_WORLD_ID_CHARS)


def model_name(value: str) -> str:
    return _check_string("model", value, MAX_MODEL_NAME_CHARS)
