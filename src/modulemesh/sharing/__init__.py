"""Working with saved modules across runs and people: continue, compose, forget, merge."""
