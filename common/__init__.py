"""minedraft.common: what the scheduler side (minedraft.runtime) and the workers
(minedraft.workers) share, importing neither: the messages that cross a process boundary and
their codec (protocol), the config schema (config), CurveZMQ keys (curve), and the request
record with its commit semantics (request). Standard library, msgpack and pyzmq only; never torch.
"""
