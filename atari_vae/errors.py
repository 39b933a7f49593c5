"""The one exception type the CLI turns into a clean one-line message."""


class AtariVaeError(Exception):
    """A problem the user can fix (bad flag, missing file, unreachable server)."""


class ConfigError(AtariVaeError, ValueError):
    """A flag value outside what is allowed."""


class NonFiniteLossError(AtariVaeError, FloatingPointError):
    """Training produced a NaN or Inf loss."""
