"""Many audits at once: catalogues, Ray tasks, progress and result tables."""
