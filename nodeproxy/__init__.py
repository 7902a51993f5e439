"""The nodeproxy daemon: identity, TLS, HBONE, listeners, pool, relay, metrics, admin."""
