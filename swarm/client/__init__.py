"""Client library: run a model whose blocks are served by a swarm."""
