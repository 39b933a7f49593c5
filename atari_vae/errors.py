"""The exception types the CLI turns into a clean one-line message, and how it tells an
interrupt from a failure."""


class AtariVaeError(Exception):
    """A problem the user can fix (bad flag, missing file, unreachable server)."""


class ConfigError(AtariVaeError, ValueError):
    """A flag value outside what is allowed."""


class NonFiniteLossError(AtariVaeError, FloatingPointError):
    """Training produced a NaN or Inf loss."""


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is a KeyboardInterrupt or was raised by one: a signal that lands while a C
    extension initialises (matplotlib's Agg backend) surfaces as the ImportError it caused."""
    seen: set[int] = set()
    chained: BaseException | None = exc
    while chained is not None and id(chained) not in seen:
        if isinstance(chained, KeyboardInterrupt):
            return True
        seen.add(id(chained))
        chained = chained.__cause__ or chained.__context__
    return False
