"""Built-in noprop-bench plugins, each registered through the ``noprop_bench`` entry-point group."""
