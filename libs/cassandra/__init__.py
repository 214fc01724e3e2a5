"""Cassandra behind small stores: tasks, tenants and API keys, dedup claims; versioned schema."""
