"""Running trials: the training clock and budgets, one trial's runner, the results store, and the jobs
and executor base through which trials are handed to executors."""
