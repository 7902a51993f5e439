"""Per-pod listeners (outbound 15001, inbound plaintext 15006, inbound HBONE 15008)."""
