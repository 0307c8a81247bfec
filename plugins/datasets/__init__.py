"""Built-in dataset plugins: one module per family of datasets, each with a ``register_datasets`` hook."""
