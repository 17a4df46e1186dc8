"""``peftkit serve``: an HTTP API over several classification adapters of one base.

One base is loaded once with every adapter named on the command line (:func:`~.multi.load_named`).
Requests from any number of clients, for any of the adapters, are gathered by :class:`Batcher`
into mixed-adapter batches under a small time and size budget, and each batch is one forward
pass (:func:`~.multi.predict_rows`), so an answer carries exactly the numbers ``peftkit predict``
gives for its adapter. The app is FastAPI on uvicorn (ASGI), the standard Python pair; metrics
are Prometheus text through ``prometheus-client``.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/classify`` and ``GET /metrics``.
Errors are ``{"error": {"message", "type"}}`` with their HTTP status. Limits: body size (413),
texts per request (400), a bounded queue (429 with ``Retry-After``), a per-request timeout
(504) and an optional bearer key (401, compared in constant time).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request  # at module level: FastAPI resolves the handlers' annotations here

from .errors import PeftkitError


@dataclass
class Limits:
    """What one request may ask, and how the server batches."""

    max_body: int = 1 << 20  # bytes
    max_texts: int = 64
    max_batch: int = 32  # texts per forward pass
    batch_wait: float = 0.005  # seconds a batch waits for more requests
    max_queue: int = 256  # requests waiting; more get 429
    timeout: float = 30.0  # seconds a request may wait for its answer


class ApiError(Exception):
    """An error answer: its HTTP status, OpenAI-style type, message and headers."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


@dataclass
class _Job:
    adapter: str
    texts: list[str]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Gathers requests for any adapters into mixed batches, computed one at a time by a worker
    thread (the model is not shared between threads)."""

    def __init__(self, compute: Any, limits: Limits, metrics: Any = None):
        self.compute, self.limits, self.metrics = compute, limits, metrics
        self.jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=limits.max_queue)
        self.thread = threading.Thread(target=self._run, name="peftkit-batcher", daemon=True)
        self.thread.start()

    def submit(self, adapter: str, texts: list[str]) -> asyncio.Future:
        """Queue a request; its future receives one probability row per text.

        Raises:
            ApiError: the queue is full (429).
        """
        loop = asyncio.get_running_loop()
        job = _Job(adapter, texts, loop, loop.create_future())
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(429, "rate_limit_error", "the server is busy; retry shortly",
                           {"Retry-After": "1"}) from None
        return job.future

    def depth(self) -> int:
        return self.jobs.qsize()

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)

    def _gather(self, first: _Job) -> list[_Job]:
        batch, size = [first], len(first.texts)
        deadline = time.perf_counter() + self.limits.batch_wait
        while size < self.limits.max_batch:
            left = deadline - time.perf_counter()
            try:
                job = self.jobs.get(timeout=left) if left > 0 else self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.jobs.put(None)  # seen again by the loop, after this batch
                break
            batch.append(job)
            size += len(job.texts)
        return batch

    def _run(self) -> None:
        while (first := self.jobs.get()) is not None:
            batch = [j for j in self._gather(first) if not j.future.cancelled()]
            if not batch:
                continue
            texts = [t for j in batch for t in j.texts]
            names = [j.adapter for j in batch for _ in j.texts]
            try:
                rows = self.compute(texts, names)
            except Exception as exc:  # every waiting request learns of it; the server keeps serving
                for j in batch:
                    j.loop.call_soon_threadsafe(_settle, j.future, None, exc)
                continue
            if self.metrics is not None:
                self.metrics.batch_size.observe(len(texts))
            start = 0
            for j in batch:
                j.loop.call_soon_threadsafe(_settle, j.future, rows[start:start + len(j.texts)], None)
                start += len(j.texts)


def _settle(future: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if future.done():  # the client gave up (timeout, disconnect)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


class Metrics:
    """The Prometheus series the server exports (its own registry, so apps never collide)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("peftkit_requests", "requests answered", ["endpoint", "adapter", "status"],
                                registry=self.registry)
        self.latency = Histogram("peftkit_request_seconds", "time to answer a request", ["endpoint"],
                                 registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.batch_size = Histogram("peftkit_batch_texts", "texts per forward pass", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queue_depth = Gauge("peftkit_queue_depth", "requests waiting for a batch", registry=self.registry)
        self.adapters = Gauge("peftkit_adapters_loaded", "adapters in memory", registry=self.registry)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def parse_classify(body: bytes, known: list[str], limits: Limits) -> tuple[str, list[str]]:
    """The adapter and texts of a ``/v1/classify`` body, or the 400/404 that says what is wrong."""
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_request_error", "the body is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, "invalid_request_error", f"the body is not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request_error", 'expected a JSON object {"adapter": ..., "texts": [...]}')
    adapter, texts = data.get("adapter"), data.get("texts")
    if not isinstance(adapter, str):
        raise ApiError(400, "invalid_request_error", f"'adapter' must be a string, one of: {', '.join(known)}")
    if adapter not in known:
        raise ApiError(404, "not_found_error", f"no adapter named {adapter[:64]!r}; loaded: {', '.join(known)}")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise ApiError(400, "invalid_request_error", "'texts' must be a non-empty list of strings")
    if len(texts) > limits.max_texts:
        raise ApiError(400, "invalid_request_error", f"{len(texts)} texts in one request; at most {limits.max_texts}")
    return adapter, texts


def create_app(named: Any, limits: Limits | None = None, api_key: str | None = None) -> Any:
    """The FastAPI app over ``named`` (a :class:`~.multi.NamedModel` of classifiers)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response

    from .multi import predict_rows

    limits = limits or Limits()
    metrics = Metrics()
    metrics.adapters.set(len(named.names))
    batcher = Batcher(lambda texts, names: predict_rows(named, texts, names, batch_size=limits.max_batch),
                      limits, metrics)
    app = FastAPI(title="peftkit", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher
    tokenizer = named.tokenizer

    def error(exc: ApiError, endpoint: str, adapter: str = "") -> JSONResponse:
        metrics.requests.labels(endpoint, adapter, str(exc.status)).inc()
        return JSONResponse({"error": {"message": exc.message, "type": exc.kind}}, exc.status, headers=exc.headers)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        sent = request.headers.get("authorization", "")
        scheme, _, token = sent.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), api_key.encode()):
            raise ApiError(401, "authentication_error", "a valid 'Authorization: Bearer KEY' header is required",
                           {"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body:
            raise ApiError(413, "invalid_request_error", f"the body is over {limits.max_body} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body:
                raise ApiError(413, "invalid_request_error", f"the body is over {limits.max_body} bytes")
        return body

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "adapters": len(named.names), "queue": batcher.depth()}

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        try:
            authorize(request)
        except ApiError as exc:
            return error(exc, "models")
        data = [{"id": name, "object": "model", "owned_by": "peftkit", "task": "classification",
                 "labels": named.label_names[name], "base": named.base_model} for name in named.names]
        return {"object": "list", "data": data}

    @app.post("/v1/classify")
    async def classify(request: Request) -> Any:
        start, adapter = time.perf_counter(), ""
        try:
            authorize(request)
            adapter, texts = parse_classify(await read_body(request), named.names, limits)
            future = batcher.submit(adapter, texts)
            metrics.queue_depth.set(batcher.depth())
            try:
                rows = await asyncio.wait_for(future, limits.timeout)
            except asyncio.TimeoutError:
                raise ApiError(504, "timeout_error", f"no answer within {limits.timeout:g} s") from None
        except ApiError as exc:
            return error(exc, "classify", adapter)
        labels = named.label_names[adapter]
        limit = named.max_length(adapter)
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
        results = []
        for row, n in zip(rows, lengths):
            scores = {label: float(p) for label, p in zip(labels, row)}
            results.append({"label": max(scores, key=scores.get), "scores": scores, "truncated": n > limit})
        metrics.requests.labels("classify", adapter, "200").inc()
        metrics.latency.labels("classify").observe(time.perf_counter() - start)
        return {"adapter": adapter, "max_tokens": limit, "results": results}

    @app.get("/metrics")
    async def metrics_text() -> Response:
        metrics.queue_depth.set(batcher.depth())
        return Response(metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": {"message": f"internal error: {type(exc).__name__}", "type": "server_error"}},
                            500)

    return app


def serve(specs: list[tuple[str, Any]], *, model: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, limits: Limits | None = None, echo: Any = print) -> int:
    """Load the adapters and serve them until SIGINT/SIGTERM (uvicorn stops accepting, lets the
    requests in flight finish, then returns); returns the exit code."""
    import uvicorn

    from .multi import load_named

    named = load_named(specs, model)
    if any(f.meta.get("task") == "causal_lm" or f.config.get("task_type") == "CAUSAL_LM"
           for f in named.files.values()):
        raise PeftkitError("serve answers classification adapters so far; causal-LM adapters are not served yet",
                           "--adapter", "serve classifiers, or use peftkit generate")
    app = create_app(named, limits, api_key)
    echo(f"serving {', '.join(named.names)} on {named.base_model} at http://{host}:{port}")
    server = _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    try:
        server.run()
    finally:
        app.state.batcher.close()
    return 0


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, but a SIGTERM or SIGINT ends in a clean exit 0 after the drain
        (uvicorn itself re-raises the signal once it has shut down)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


def _Server(config: Any) -> Any:  # noqa: N802 - builds the subclass only once uvicorn is imported
    return _server_class()(config)
