"""Reports from trial records: Table 1 and 2, time to accuracy, the inference sweep, Figure 3, the paper's
numbers and regression baselines."""
