"""Ray execution: prior actors, simulator workers, dispatch with streaming gather and fault handling.

The only package that imports Ray. It may import `problems` and `priors`, never `runner` or `store`.
"""
