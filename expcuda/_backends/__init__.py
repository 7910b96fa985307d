"""One module per backend: ``unavailable()``, ``refuses(device, dtype)``, and at import the
registration of its kernels with :mod:`expcuda.registry`."""


def per_tensor(refuses):
    """A backend's ``refuses(device, dtype)`` as the registry's per-tensor predicate."""
    return lambda t: refuses(t.device, t.dtype)
