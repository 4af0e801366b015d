"""Command-line experiments: one script per task, options as flags."""
