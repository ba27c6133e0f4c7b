"""Typed errors. Every message names the bad value and what to do about it;
the gRPC service maps each class to one status code."""

SHOWN_CHARS = 64  # how much of a value from outside an error message echoes


def shown(value) -> str:
    """A value from outside (request, file, argument) as an error message
    quotes it: its repr, cut at SHOWN_CHARS with an ellipsis, so a huge input
    never makes a huge message."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        text = f"<a {value.bit_length()}-bit integer>"
    return cut(text)


def cut(text: str) -> str:
    """Text from outside, cut at SHOWN_CHARS with an ellipsis."""
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "…"


class L4lbError(Exception):
    """Base of all l4lb errors."""


class ValidationError(L4lbError, ValueError):
    """A bad value in a request, a config file or a CLI argument (INVALID_ARGUMENT)."""


class NotFoundError(L4lbError, KeyError):
    """The VIP or backend named does not exist (NOT_FOUND)."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0]) if self.args else ""


class AlreadyExistsError(L4lbError):
    """The VIP or backend exists already (ALREADY_EXISTS)."""


class CapacityError(L4lbError):
    """The maps are full (RESOURCE_EXHAUSTED)."""


class ConfigError(ValidationError):
    """A configuration file that cannot be used; the message says where."""


class BpfError(L4lbError):
    """Compiling, loading, attaching or a map operation failed in the kernel or in bcc."""


class StateError(L4lbError):
    """The pinned state does not match what this process expects (FAILED_PRECONDITION)."""


class PersistError(CapacityError):
    """The desired state could not be saved (a full disk, a read-only state
    directory): the request changed nothing (RESOURCE_EXHAUSTED)."""
