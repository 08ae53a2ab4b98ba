"""`swarm serve`, `swarm monitor`, `swarm chat`: the OpenAI API, the status page, a terminal chat."""
