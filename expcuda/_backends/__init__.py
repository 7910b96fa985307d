"""One module per backend: ``unavailable()``, ``refuses(device, dtype)`` and the kernels."""
