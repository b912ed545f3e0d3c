"""One report per run (report.json, report.md) and its plots."""
