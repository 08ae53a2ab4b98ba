"""Swarm node: what a volunteer runs (`swarm-node join`)."""
