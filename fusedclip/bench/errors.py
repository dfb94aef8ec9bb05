"""The one exception of the benchmark harness."""


class BenchError(Exception):
    """A problem with the benchmark's options or environment, reported as a message, not a traceback."""
