"""``peftkit serve``: an HTTP API and a web page over many adapters of one base.

One base is loaded once with every adapter named on the command line (:func:`~.multi.load_named`);
with ``--adapters-dir``, adapter folders there are loaded on first use into a bounded LRU
(:class:`~.workers.AdapterStore`). One worker thread runs the model: classification requests
for any adapters are gathered into mixed-adapter batches, one forward pass each
(:func:`~.multi.predict_rows`, so an answer carries exactly the numbers ``peftkit predict``
gives), and generation requests share a running batch step by step (continuous batching). The
app is FastAPI on uvicorn (ASGI), the standard Python pair; metrics are Prometheus text through
``prometheus-client``.

Endpoints: ``GET /`` (the page), ``GET /health``, ``GET /v1/models``, ``POST /v1/classify``,
OpenAI's ``POST /v1/completions`` and ``POST /v1/chat/completions`` (``stream`` as server-sent
events), ``GET /v1/runs`` (with ``--runs``) and ``GET /metrics``. Errors are ``{"error":
{"message", "type"}}`` with their HTTP status. Limits: body size (413), texts per request and
``max_tokens`` (400), a bounded queue (429 with ``Retry-After``), a per-request timeout (504) and
an optional bearer key (401, compared in constant time).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from ..adapter_io import WEIGHTS_FILE, AdapterFiles, read_adapter
from ..causal import LMEncoder
from ..config import DataConfig
from ..errors import PeftkitError
from ..generation import Sequence
from ..multi import NamedModel, load_named, predict_rows
from ..predict import lm_encoder
from .page import page_html, read_runs, run_of
from .protocol import (
    ChatRequest,
    Sampling,
    bad,
    chat_prompt,
    completion,
    new_id,
    parse_chat,
    parse_classify,
    parse_completion,
    parse_sampling,
    read_json,
    sse,
)
from .workers import AdapterStore, ApiError, Batcher, Generator, GenWork, Job, Limits, Metrics, TextStream, served_path


class Service:
    """What the endpoints do, over one :class:`~.multi.NamedModel` (classifiers or causal LMs)."""

    def __init__(
        self,
        named: NamedModel,
        limits: Limits,
        api_key: str | None = None,
        adapters_dir: Path | None = None,
        runs: Path | None = None,
        fixed: list[str] | None = None,
        thread: bool = True,
    ):
        self.named, self.limits, self.api_key, self.runs = named, limits, api_key, runs
        self.metrics = Metrics()
        self.store = AdapterStore(named, adapters_dir, limits.max_adapters, self.metrics, fixed)
        self.causal = named.task == "causal_lm"
        if self.causal:  # reward adapters beside the LM ones are scored by the same worker, between steps
            self.worker: Generator | Batcher = Generator(
                named, self.render, self.store, limits, self.metrics, thread, score=self._classify_rows
            )
        else:
            self.worker = Batcher(
                self._classify_rows,
                self.store,
                limits,
                self.metrics,
                thread,
            )
        self._encoders: dict[
            str | None, tuple[AdapterFiles | None, LMEncoder]
        ] = {}  # adapter -> (its files, its prompt format)

    # ---- shared by the endpoints ----
    def error(self, exc: ApiError, endpoint: str, adapter: str = "") -> JSONResponse:
        self.metrics.requests.labels(endpoint, adapter, str(exc.status)).inc()
        return JSONResponse({"error": {"message": exc.message, "type": exc.kind}}, exc.status, headers=exc.headers)

    def done(self, endpoint: str, adapter: str, start: float) -> None:
        self.metrics.requests.labels(endpoint, adapter, "200").inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise ApiError(
                401,
                "authentication_error",
                "a valid 'Authorization: Bearer KEY' header is required",
                {"WWW-Authenticate": "Bearer"},
            )

    async def body(self, request: Request, shape: str) -> dict[str, Any]:
        """The request's JSON object, read up to the body limit (413 past it)."""
        self.authorize(request)
        declared, limit = request.headers.get("content-length"), self.limits.max_body
        too_large = ApiError(413, "invalid_request_error", f"the body is over {limit} bytes")
        chunks = request.stream()
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _drain(chunks)
            raise too_large
        body = bytearray()
        async for chunk in chunks:
            body += chunk
            if len(body) > limit:
                await _drain(chunks)
                raise too_large
        data = read_json(bytes(body), shape)
        name = data.get("adapter", data.get("model"))
        if isinstance(name, str) and (
            name in self.named.names or self.store.path(name) or (self.causal and name == self.named.base_model)
        ):
            request.state.adapter = name  # the metrics' adapter label: only names that exist
        return data

    def models(self) -> list[dict[str, Any]]:
        task = self.named.task
        data = [
            {
                "id": name,
                "object": "model",
                "owned_by": "peftkit",
                "task": task,
                "labels": self.named.label_names.get(name),
                "base": self.named.base_model,
                "loaded": name in self.named.names,
            }
            for name in self.store.available()
        ]
        for entry in data:
            folder = self._folder_of(entry["id"])
            run = run_of(self.runs, folder)  # the training run it came from, where --runs shows it
            if run is not None:
                entry["run"] = run
            if entry["id"] in self.named.scorers:  # a reward model beside the LM adapters
                entry["task"] = "reward"
                continue
            if self.causal:  # what a completion's prompt goes through, as `peftkit generate` sends it
                files = self.named.files.get(entry["id"]) or read_adapter(folder)
                entry["labels"] = files.meta.get("label_names")
                entry["prompt_format"] = {
                    key: files.meta.get(key) for key in ("prompt_template", "chat_template", "system_prompt")
                }
        if self.causal:
            data.append(
                {
                    "id": self.named.base_model,
                    "object": "model",
                    "owned_by": "peftkit",
                    "task": task,
                    "labels": None,
                    "base": None,
                    "loaded": True,
                }
            )
        return data

    def _folder_of(self, name: str) -> Path | None:
        files = self.named.files.get(name)
        return Path(files.path) if files is not None and files.path else self.store.path(name)

    # ---- classification ----
    def _classify_rows(self, texts: list[str], names: list[str]) -> list[tuple[np.ndarray, bool]]:
        """Each text's probabilities under its adapter, and whether it was cut to the adapter's
        max_length (on the worker thread)."""
        rows = predict_rows(self.named, texts, names, batch_size=self.limits.max_batch)
        lengths = [len(ids) for ids in self.named.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        return [(row, n > self.named.max_length(name)) for row, n, name in zip(rows, lengths, names)]

    async def classify(self, data: dict[str, Any]) -> dict[str, Any]:
        scorers = list(self.named.scorers)
        if self.causal and not scorers:
            raise bad("this server serves causal-LM adapters: use /v1/completions or /v1/chat/completions")
        available = scorers if self.causal else self.store.available()
        asked = parse_classify(data, self.limits, available[0] if len(available) == 1 else None)
        adapter, texts = asked.adapter, asked.texts
        if self.causal and adapter not in scorers:
            raise bad(
                f"{adapter!r} generates text: use /v1/completions or /v1/chat/completions "
                f"(/v1/classify scores with the reward adapters: {', '.join(scorers)})"
            )
        self.store.check(adapter)
        rows = await self._answer(Job(adapter, texts, asyncio.get_running_loop(), None))
        labels = self.named.label_names[adapter]
        results = []
        for probs, cut in rows:
            if self.named.is_reward(adapter):  # a reward model: one score per text
                results.append({"score": float(probs[0]), "truncated": cut})
                continue
            scores = {label: float(p) for label, p in zip(labels, probs)}
            results.append({"label": max(scores, key=scores.get), "scores": scores, "truncated": cut})
        return {"adapter": adapter, "max_tokens": self.named.max_length(adapter), "results": results}

    async def _answer(self, job: Job) -> list[tuple[np.ndarray, bool]]:
        future = job.loop.create_future()
        job.deliver = lambda value, error: _settle(future, value, error)
        self.worker.submit(job)
        try:
            return await asyncio.wait_for(future, self.limits.timeout)
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout_error", f"no answer within {self.limits.timeout:g} s") from None
        finally:
            job.cancelled = True

    # ---- generation ----
    def encoder(self, adapter: str | None) -> LMEncoder:
        """The prompt format of ``adapter`` (None: the base's, its chat template if it has one)."""
        files = self.named.files.get(adapter) if adapter else None
        cached = self._encoders.get(adapter)
        if cached is None or cached[0] is not files:  # new, or its folder was loaded again
            encoder = (
                lm_encoder(self.named.tokenizer, files) if files else LMEncoder(self.named.tokenizer, DataConfig())
            )
            self._encoders[adapter] = cached = (files, encoder)
        return cached[1]

    def render(self, work: GenWork, adapter: str | None) -> tuple[Sequence, TextStream]:
        """A request's token ids, stop tokens and text stream (on the worker thread)."""
        tok, s = self.named.tokenizer, work.sampling
        if adapter in self.named.scorers:
            raise bad(f"{adapter!r} is a reward model: POST its texts to /v1/classify for their scores")
        if self.named.adapters.adds_tokens(adapter):
            raise bad(f"{adapter!r} is a prompt or prefix adapter; serve generates with LoRA and IA3 adapters so far")
        enc = self.encoder(adapter)
        if work.kind == "chat" and enc.chat:
            ids, stops = chat_prompt(tok, work.prompt, enc.cfg.system_prompt), enc.stop_ids
        elif work.kind == "chat":  # an adapter trained without a chat template: its own prompt format
            last = next(m["content"] for m in reversed(work.prompt) if m["role"] == "user")
            ids, stops = enc.prompt_for(last), enc.stop_ids
        else:  # a completion asks as `peftkit generate --prompt` does (raw, or the base: the text as it is)
            raw = work.raw or adapter is None
            ids, stops = enc.prompt_for(work.prompt, raw), [tok.eos_token_id] if raw else enc.stop_ids
        window = getattr(self.named.model.config, "max_position_embeddings", None) or 1 << 30
        if len(ids) > self.limits.max_input_tokens or len(ids) + s.max_tokens > window:
            raise bad(
                f"the prompt is {len(ids)} tokens; with max_tokens={s.max_tokens} at most "
                f"{min(self.limits.max_input_tokens, window - s.max_tokens)} fit"
            )
        seq = Sequence(ids, s.max_tokens, adapter, s.temperature, s.top_p, frozenset(t for t in stops if t is not None))
        return seq, TextStream(tok, s.stop)

    async def generate(self, data: dict[str, Any], kind: str) -> dict[str, Any] | StreamingResponse:
        """A completion (``kind`` "text") or chat answer, whole or streamed."""
        if not self.causal:
            raise bad("this server serves classifiers: use /v1/classify")
        s = parse_sampling(data, self.limits, 16 if kind == "text" else self.limits.max_tokens)
        asked = parse_chat(data, self.limits) if kind == "chat" else parse_completion(data, self.limits)
        prompt = asked.messages if isinstance(asked, ChatRequest) else asked.prompt
        raw = asked.raw
        adapter = None if s.model == self.named.base_model else self.store.check(s.model)
        events: asyncio.Queue = asyncio.Queue()
        job = Job(
            adapter,
            GenWork(kind, s, prompt, raw),
            asyncio.get_running_loop(),
            lambda value, error: events.put_nowait((value, error)),
        )
        self.worker.submit(job)
        try:
            first = await self._event(events, job)
        except BaseException:
            job.cancelled = True
            raise
        if s.stream:
            return self._stream(kind, s, job, events, first)
        text, finish = first
        try:
            while finish is None:
                delta, finish = await self._event(events, job)
                text += delta
        finally:
            job.cancelled = True
        return completion(kind, s.model, text, finish, _usage(job.payload.seq))

    async def _event(self, events: asyncio.Queue, job: Job) -> tuple[str, str | None]:
        try:
            value, error = await asyncio.wait_for(events.get(), self.limits.timeout)
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout_error", f"no token within {self.limits.timeout:g} s") from None
        if error is not None:
            raise error
        return value

    def _stream(
        self, kind: str, s: Sampling, job: Job, events: asyncio.Queue, first: tuple[str, str | None]
    ) -> StreamingResponse:
        ident = new_id(kind)

        async def chunks() -> AsyncIterator[bytes]:
            (delta, finish), opening = first, True
            try:
                while True:
                    yield sse(completion(kind, s.model, delta, None, ident=ident, chunk=True, first=opening))
                    opening = False
                    if finish is not None:
                        break
                    delta, finish = await self._event(events, job)
                yield sse(completion(kind, s.model, "", finish, _usage(job.payload.seq), ident=ident, chunk=True))
                yield sse("[DONE]")
            except ApiError as exc:  # the status line has gone: the error travels as an event
                yield sse({"error": {"message": exc.message, "type": exc.kind}})
            finally:
                job.cancelled = True  # a client that went away frees its place in the batch

        return StreamingResponse(chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


#: what the server reads and throws away of a body it refused (413) before answering, as nginx's
#: lingering close does: a client that sends the whole body before it reads (Python's urllib)
#: then gets the 413 instead of a connection reset. Past either bound the connection is closed.
DRAIN_BYTES = 64 << 20
DRAIN_SECONDS = 10.0


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    """Read the rest of a refused body (at most :data:`DRAIN_BYTES`, for :data:`DRAIN_SECONDS`)."""
    read = 0
    with contextlib.suppress(TimeoutError, Exception):
        async with asyncio.timeout(DRAIN_SECONDS):
            async for chunk in chunks:
                read += len(chunk)
                if read > DRAIN_BYTES:
                    break


def _usage(seq: Sequence) -> dict[str, int]:
    return {
        "prompt_tokens": len(seq.prompt),
        "completion_tokens": len(seq.tokens),
        "total_tokens": len(seq.prompt) + len(seq.tokens),
    }


def _settle(future: asyncio.Future, value: Any, error: BaseException | None) -> None:
    if future.done():  # the client gave up (timeout, disconnect)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def create_app(
    named: NamedModel,
    limits: Limits | None = None,
    api_key: str | None = None,
    adapters_dir: Path | None = None,
    runs: Path | None = None,
    fixed: list[str] | None = None,
    thread: bool = True,
) -> FastAPI:
    """The FastAPI app over ``named`` (a :class:`~.multi.NamedModel`); ``fixed`` are the adapters
    that stay loaded (default: all of ``named``'s), the others came from ``adapters_dir``. Its
    worker (``app.state.service.worker``) runs on a thread of its own, or, without ``thread``,
    on whichever thread calls its ``run()``."""
    service = Service(named, limits or Limits(), api_key, adapters_dir, runs, fixed, thread)
    app = FastAPI(title="peftkit", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    Handler = Callable[[Request], Awaitable[Any]]

    def endpoint(path: str, name: str, method: str = "post") -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            async def run(request: Request) -> Any:
                start = time.perf_counter()
                try:
                    answer = await handler(request)
                except ApiError as exc:
                    return service.error(exc, name, getattr(request.state, "adapter", ""))
                service.done(name, getattr(request.state, "adapter", ""), start)
                return answer

            return getattr(app, method)(path)(run)

        return register

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "task": named.task, "adapters": len(named.names), "queue": service.worker.depth()}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return page_html()

    @endpoint("/v1/models", "models", "get")
    async def models(request: Request) -> Any:
        service.authorize(request)
        return {"object": "list", "data": service.models()}

    @endpoint("/v1/runs", "runs", "get")
    async def runs_list(request: Request) -> Any:
        service.authorize(request)
        return read_runs(runs)

    @endpoint("/v1/classify", "classify")
    async def classify(request: Request) -> Any:
        return await service.classify(await service.body(request, '{"adapter": ..., "texts": [...]}'))

    @endpoint("/v1/completions", "completions")
    async def completions(request: Request) -> Any:
        return await service.generate(await service.body(request, '{"model": ..., "prompt": ...}'), "text")

    @endpoint("/v1/chat/completions", "chat")
    async def chat(request: Request) -> Any:
        return await service.generate(await service.body(request, '{"model": ..., "messages": [...]}'), "chat")

    @app.get("/metrics")
    async def metrics_text() -> Response:
        service.metrics.queue_depth.set(service.worker.depth())
        return Response(service.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": f"internal error: {type(exc).__name__}", "type": "server_error"}}, 500
        )

    return app


def serve(
    specs: list[tuple[str, Path]],
    *,
    model: str | None = None,
    adapters_dir: str | Path | None = None,
    runs: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    limits: Limits | None = None,
    echo: Callable[[str], object] = print,
) -> int:
    """Load the adapters and serve them until SIGINT/SIGTERM (uvicorn stops accepting, lets the
    requests in flight finish, then returns); returns the exit code.

    Raises:
        PeftkitError: nothing to serve, a folder that is not there, an adapter without
            safetensors, adapters that cannot share the base.
    """
    folder = _folder(adapters_dir, "--adapters-dir") if adapters_dir else None
    runs = _folder(runs, "--runs") if runs else None
    sock = _listen(host, port)  # a busy port is said before the slow load, and nobody takes it meanwhile
    try:
        first = specs
        if not specs:  # the base and task come from the first adapter of the folder
            found = sorted(p.name for p in folder.iterdir() if served_path(folder, p.name)) if folder else []
            first = [(found[0], folder / found[0])] if found else [None]
            if first[0] is None:
                raise PeftkitError(
                    "nothing to serve",
                    "--adapter",
                    "name an adapter (--adapter NAME=DIR), or put adapter folders in --adapters-dir",
                )
        for name, path in first:
            if not (Path(path) / WEIGHTS_FILE).is_file():
                raise PeftkitError(
                    f"adapter {name!r} has no {WEIGHTS_FILE}; serve reads safetensors only",
                    str(path),
                    "save the adapter again with peftkit or peft (safetensors)",
                )
        named = load_named(first, model)
        tokens = [n for n in named.names if named.task == "causal_lm" and named.adapters.adds_tokens(n)]
        if tokens:
            raise PeftkitError(
                f"{tokens[0]!r} is a prompt or prefix causal-LM adapter; serve generates with LoRA and "
                "IA3 adapters so far",
                "--adapter",
                "serve it with peftkit generate",
            )
        app = create_app(named, limits, api_key, folder, runs, fixed=[n for n, _ in specs], thread=False)
        shown = ", ".join(named.names) + (f" and the adapters in {folder}" if folder else "")
        echo(f"serving {shown} on {named.base_model} at http://{host}:{port}")
        return _run(app, uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False), sock)
    finally:
        sock.close()


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` for uvicorn to listen on.

    Raises:
        PeftkitError: the address is taken or cannot be bound.
    """
    sock = None
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise PeftkitError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc})",
            "--port",
            "pick a free port, or stop what uses it",
        ) from None
    return sock


def _run(app: FastAPI, config: uvicorn.Config, sock: socket.socket) -> int:
    """HTTP on a thread, the model on this (main) thread: torch runs its operator threads up to
    2-3x slower from a second thread once the main one has used them. SIGTERM or SIGINT stops
    the HTTP side accepting; once the requests in flight are answered the worker stops too."""
    worker = app.state.service.worker
    server = _server_class()(config)

    def http() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            worker.close()

    previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http, name="peftkit-http")
    thread.start()
    try:
        worker.run()
    finally:
        server.should_exit = True
        thread.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise PeftkitError("the HTTP server did not start", "serve", "run again with --debug to see why")
    return 0


def _folder(path: str | Path, flag: str) -> Path:
    if not Path(path).is_dir():
        raise PeftkitError(f"{path} is not a folder", flag, "pass an existing folder")
    return Path(path)


def _server_class() -> type:
    """uvicorn's Server class for a thread that is not the main one (built here, once uvicorn is
    imported): the main thread takes the signals (:func:`_run`)."""

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server
