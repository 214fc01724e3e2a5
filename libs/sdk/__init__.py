"""Weir's Python SDK: a client for submitting tasks, and the handler side.

    from libs import sdk

    @sdk.task
    def resize(payload: bytes) -> bytes:
        ...

    client = sdk.Client("127.0.0.1:50051", api_key=...)
    task = client.create_task("resize", b"...")
    done = client.wait(task.task_id)
"""

from weir.v1.tasks_pb2 import TaskState

from libs.sdk.client import Client, TaskFailed
from libs.sdk.handlers import (
                               Attempt,
                               NonRetryableError,
                               RetryableError,
                               ThrottledError,
                               current_attempt,
                               task,
)

__all__ = ["Attempt", "Client", "NonRetryableError", "RetryableError", "TaskFailed",
           "TaskState", "ThrottledError", "current_attempt", "task"]
