"""Backends: thin adapters that own the worker replicas (local processes; Docker in part 2)."""
