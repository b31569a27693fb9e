"""Where the text to speak comes from, as an async stream of chunks ready to send as `text` messages.

Reading a pipe chunk by chunk as it fills (not until EOF) is what lets `llm | speakd-say -` start
speaking while the model is still writing.
"""

from __future__ import annotations

import asyncio
import codecs
import os
import threading
from collections.abc import AsyncIterator

MAX_CHUNK_CHARS = 4096
"""At most 16 KiB of UTF-8 per `text` message: far below the server's default 64 KiB frame limit."""


async def text_chunks(text: str, max_chars: int = MAX_CHUNK_CHARS) -> AsyncIterator[str]:
    """A whole text in frame-sized pieces."""
    for start in range(0, len(text), max_chars):
        yield text[start : start + max_chars]


async def fd_chunks(fd: int, chunk_bytes: int = MAX_CHUNK_CHARS) -> AsyncIterator[str]:
    """Text from a file descriptor, each chunk as soon as the writer produced it, until EOF.

    A daemon thread does the blocking reads: unlike `loop.connect_read_pipe` it also works for regular
    files and terminals, and unlike the default executor it cannot hold up interpreter exit while a
    read is still blocked after Ctrl-C.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | OSError | None] = asyncio.Queue()

    def deliver(item: bytes | OSError | None) -> bool:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            return False
        return True

    def pump() -> None:
        try:
            while chunk := os.read(fd, chunk_bytes):
                if not deliver(chunk):
                    return
        except OSError as exc:
            deliver(exc)
            return
        deliver(None)

    threading.Thread(target=pump, name="speakd-say-input", daemon=True).start()
    # Chunks split UTF-8 sequences anywhere; the incremental decoder carries partial ones over.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while (item := await queue.get()) is not None:
        if isinstance(item, OSError):
            raise item
        if text := decoder.decode(item):
            yield text
    if tail := decoder.decode(b"", final=True):
        yield tail
