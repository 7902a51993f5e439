"""Shared test helpers: waiting for a condition with a deadline (``waiting``) and the async
hygiene checks every async test runs under (``hygiene``, wired up in ``tests/conftest.py``)."""
