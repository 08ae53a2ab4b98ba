"""SWARM training, trainer side: data and the driver that streams micro-batches through the swarm."""
