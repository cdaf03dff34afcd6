"""An OpenAI-compatible HTTP server over one loaded Dovetail engine, with llama.cpp server's extensions.

One worker thread owns the engine and serves jobs from a bounded FIFO queue;
the event loop never waits on the engine, and tokenizing and template
rendering happen off the worker. A request past the queue's bound gets a 429
at once. A client that goes away is dropped from the queue, or frees the engine
at the next round of its generation. Errors come back in OpenAI's error shape,
as a final event once a stream has started, and never take the server down.

One module per API surface (:mod:`.openai`, :mod:`.llamacpp`) over the shared
:mod:`.worker`, the request-to-options mapping of :mod:`.options`, and the app
of :mod:`.app`.
"""

from .app import create_app

__all__ = ["create_app"]
