"""Built-in noprop-bench plugins, each registered through the ``noprop_bench`` entry-point group.

``methods/``, ``datasets/`` and ``executors/`` hold one plugin module each; ``parts/`` holds the pieces
the methods share, which are not plugins.
"""
