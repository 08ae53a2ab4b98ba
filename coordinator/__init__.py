"""Swarm coordinator: swarm map, routing policies, failover."""
