"""Pure config/state model for nodeproxy: no asyncio, no sockets, no other project imports."""
