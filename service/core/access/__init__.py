"""Who may do what, and the trail of what was done: roles and keys (`roles.py`, `keys.py`), the audit trail
(`audit.py`), and where both persist beside the classes (`store.py`: SQLite in the data directory, or tables in
the class store's PostgreSQL database)."""
