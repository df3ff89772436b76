"""Model versions: the repository of bundles a service may serve (repository.py, directory.py, postgres.py,
opened by open.py), which one serves and which one shadows (activation.py, shadow.py)."""
