"""grpc-timeout header values (gRPC over HTTP/2 spec: 1-8 digits and a unit)."""

from __future__ import annotations

import pytest

from nodeproxy.waypoint.http2_proxy import grpc_timeout


@pytest.mark.parametrize(("value", "seconds"), [
    ("200m", 0.2), ("5S", 5.0), ("1M", 60.0), ("2H", 7200.0), ("1500u", 0.0015),
    ("99999999n", 0.099999999), (None, None), ("", None), ("5", None), ("5s", None),
    ("123456789m", None), ("-1S", None), ("1.5S", None), ("5S ", None),
])
def test_grpc_timeout(value: str | None, seconds: float | None) -> None:
    got = grpc_timeout(value)
    if seconds is None:
        assert got is None
    else:
        assert got == pytest.approx(seconds)
