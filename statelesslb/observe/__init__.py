"""Read-only views for operators: reports, trace, prediction, metrics."""
