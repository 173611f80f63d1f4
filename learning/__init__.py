"""pgpilot's offline half: collectors, workload analysis, models and their registry."""
