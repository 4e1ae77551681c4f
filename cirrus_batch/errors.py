"""Exceptions that the CLI turns into one clear error line."""


class CirrusError(Exception):
    """A problem the user can act on (bad path, bad config, bad store); no traceback is shown."""


class ConfigError(CirrusError):
    """A job configuration that does not match the schema."""


class StoreError(CirrusError):
    """A zarr store that cannot be opened, written, or does not hold what a step needs."""
