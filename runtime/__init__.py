"""minedraft.runtime: the torch-free side of MineDraft (scheduler, protocol, client, CLI)."""

__all__ = ["Client", "AsyncClient", "Completion", "RequestError"]


def __getattr__(name):  # lazy, so `import minedraft.runtime.protocol` stays light
    if name in __all__:
        from minedraft.runtime import client

        return getattr(client, name)
    raise AttributeError(name)
