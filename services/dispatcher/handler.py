"""DispatcherService: executor-managers' Work streams."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator

import grpc
from google.protobuf.duration_pb2 import Duration
from weir.internal.dispatcher.v1 import dispatcher_pb2, dispatcher_pb2_grpc

from libs.errors import InvalidArgument
from services.dispatcher.owner import Owner

MAX_ID_CHARS = 128


class DispatcherHandler(dispatcher_pb2_grpc.DispatcherServiceServicer):
    """A Work stream is a coroutine: requests go to the owner as they come, responses go out
    whenever the owner has something for this executor (it wakes the stream)."""

    def __init__(self, owner: Owner, *, lease: Duration) -> None:
        self._owner = owner
        self._lease = lease
        self._ids = itertools.count(1)

    async def Work(self, request_iterator: AsyncIterator[dispatcher_pb2.WorkRequest],
                   context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[dispatcher_pb2.WorkResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        if not 0 < len(first.executor_id) <= MAX_ID_CHARS:
            raise InvalidArgument({"executor_id": f"required in the first message; at most "
                                                  f"{MAX_ID_CHARS} characters"})
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        stream_id = next(self._ids)
        self._owner.connect(stream_id, first.executor_id,
                            lambda: loop.call_soon_threadsafe(wake.set))
        self._owner.work(stream_id, first)

        async def receive() -> None:
            async for request in request_iterator:
                self._owner.work(stream_id, request)
            wake.set()

        receiving = asyncio.create_task(receive())
        try:
            yield dispatcher_pb2.WorkResponse(lease=self._lease)
            while not receiving.done():
                await wake.wait()
                wake.clear()
                response = self._owner.next_response(stream_id)
                if response is not None:
                    yield response
            receiving.result()  # a broken request stream ends this one with its error
        finally:
            self._owner.disconnect(stream_id)
            receiving.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await receiving
