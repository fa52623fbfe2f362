"""minedraft.runtime: the torch-free side of MineDraft (scheduler, server, client, CLI, HTTP front
end). It imports minedraft.workers only where it starts worker processes (runtime/ray_pool.py)."""

__all__ = ["Client", "AsyncClient", "Completion", "RequestError"]


def __getattr__(name):  # lazy, so `import minedraft.runtime` stays light
    if name in __all__:
        from minedraft.runtime import client

        return getattr(client, name)
    raise AttributeError(name)
