"""One module per backend: ``unavailable()``, ``refuses(device, dtype)``, and at import the
registration of its kernels with :mod:`expcuda.registry`."""


def per_tensor(refuses):
    """A backend's ``refuses(device, dtype)`` as the registry's per-tensor predicate."""
    return lambda t: refuses(t.device, t.dtype)


def kernel_attributes(backend: str):
    """A module ``__getattr__`` that reads ``backend.<op>`` as the kernel it registered for ``op``."""
    def __getattr__(name: str):
        from expcuda import registry
        kernel = registry._KERNELS.get(name, {}).get(backend)
        if kernel is None:
            raise AttributeError(f"the {backend} backend has no kernel {name!r}")
        return kernel.fn
    return __getattr__
