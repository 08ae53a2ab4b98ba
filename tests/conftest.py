"""Shared pytest setup."""

from hypothesis import settings

# Session fixtures of the one swarm the serve / chat / status page tests share.
pytest_plugins = ["tests.swarm_fixtures"]

# Property tests explore the same examples on every run, so CI is reproducible; a failure found
# once (e.g. while developing with another seed) becomes a regular regression test.
settings.register_profile("swarm", derandomize=True)
settings.load_profile("swarm")
