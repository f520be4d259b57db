"""Request routing across instances: pure policies (no sockets), used by the simulator
now and by the router proxy."""
