"""Triton kernels of pcfast (importable as ``pcfast.kernels``)."""
