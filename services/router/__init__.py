"""Router: the routing table (tenant, function) -> topic and shuffle-shard partitions."""
