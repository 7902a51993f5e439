"""Waypoint proxy: the optional L7 layer (routing, retries, timeouts, circuit breaking,
L7 policy) that node agents send traffic through."""
