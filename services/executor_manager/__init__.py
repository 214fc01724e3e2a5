"""Executor-manager: runs pushed tasks in a pool of worker processes on its node."""
