"""Discrete-event simulation of kvmesh instances: the engine's own pure core on a virtual
clock, with a cost model in place of the model runner. Never imports torch."""
