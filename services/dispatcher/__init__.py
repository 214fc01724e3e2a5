"""Dispatcher: consumes task topics and pushes tasks to executor-managers by their load."""
