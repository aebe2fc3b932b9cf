"""The numerical core, framework-free: ``noise`` (keyed directions), ``passes`` (chunked
passes over parameters) and ``optimizer`` (``ZOOptimizer``)."""
