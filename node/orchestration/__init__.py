"""Orchestration: series assembly, selection rules, the workers that run the pipeline on
selected series, where results go, and the offline cohort runner."""
