"""Reports from trial records: Table 1 and 2, time to accuracy, the inference sweep, Figure 3, the paper's
numbers and regression baselines; the same records as pandas DataFrames (``frames``) and as CSV, Parquet,
JSON and one self-contained HTML page (``exports``)."""
