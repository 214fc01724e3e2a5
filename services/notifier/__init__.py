"""Notifier: delivers task outcomes to webhooks, topics and watch streams."""
