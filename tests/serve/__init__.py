"""Tests of `swarm serve`, `swarm monitor` and `swarm chat`, sharing one local swarm (conftest.py)."""
