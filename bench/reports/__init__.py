"""What the harness prints and draws from records and runs: summaries, cost reports, pictures, the regression
check, RobustBench export and the registry listings."""
