"""The work behind ``peftkit serve``: the adapters a server answers for, and the worker thread
that runs the model for every request.

The model is never shared between threads: one worker owns it, and it alone loads, unloads and
runs adapters. :class:`Batcher` gathers classification requests for any adapters into mixed
batches, one forward pass each. :class:`Generator` batches generation step by step (continuous
batching): requests join the running batch between two decoding steps and leave it when they
finish or their client goes away, so one long answer never holds up the others.
:class:`AdapterStore` resolves a request's adapter name: those named at start, and adapter
folders under ``--adapters-dir``, loaded on first use and kept in a bounded LRU.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..adapter_io import CONFIG_FILE, WEIGHTS_FILE
from ..errors import PeftkitError
from ..generation import StepDecoder
from ..methods.named import NAME


def _glibc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc: its allocator keeps its own policy
        return None


_LIBC = _glibc()
TRIM_EVERY = 5.0  # seconds between two malloc_trim calls of a busy worker


@dataclass
class Limits:
    """What one request may ask, and how the server batches."""

    max_body: int = 1 << 20  # bytes
    max_texts: int = 64
    max_batch: int = 32  # texts per forward pass; sequences in the running generation batch
    batch_wait: float = 0.005  # seconds a batch waits for more requests
    max_queue: int = 256  # requests waiting; more get 429
    timeout: float = 30.0  # seconds a request may wait for its answer
    max_tokens: int = 256  # tokens one generation request may ask for
    max_input_tokens: int = 2048  # prompt tokens one generation request may send
    max_adapters: int = 8  # adapters from --adapters-dir kept loaded at once
    decode: str = "off"  # generation's prepared products (DECODE_DTYPES), or "off"


#: ``Limits.decode``: the dtype generation's prepared products multiply in (accel.DecodeProducts)
DECODE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ApiError(Exception):
    """An error answer: its HTTP status, OpenAI-style type, message and headers."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


def not_found(name: str, known: list[str]) -> ApiError:
    return ApiError(404, "not_found_error", f"no adapter named {name[:64]!r}; available: {', '.join(known)}")


class Metrics:
    """The Prometheus series the server exports (its own registry, so apps never collide)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("peftkit_requests", "requests answered", ["endpoint", "adapter", "status"], registry=r)
        self.latency = Histogram(
            "peftkit_request_seconds",
            "time to answer a request",
            ["endpoint"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.batch_size = Histogram(
            "peftkit_batch_rows",
            "rows per forward pass (texts, or generating sequences)",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.queue_depth = Gauge("peftkit_queue_depth", "requests waiting for the worker", registry=r)
        self.adapters = Gauge("peftkit_adapters_loaded", "adapters in memory", registry=r)
        self.generating = Gauge("peftkit_generating", "sequences in the running generation batch", registry=r)
        self.decode_steps = Counter(
            "peftkit_decode_steps",
            "generation steps: through the model, prepared products (--decode), or those and the own step",
            ["path"],
            registry=r,
        )
        self.prepared = Counter("peftkit_decode_prepared", "sets of prepared products made (--decode)", registry=r)
        self.tokens = Counter("peftkit_generated_tokens", "tokens generated", registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)


class AdapterStore:
    """The adapters a server answers for. Those named at start stay loaded; with ``folder``,
    every subfolder holding an adapter (config and safetensors) is served under its folder name:
    loaded on first use, reloaded when its files change, unloaded when its folder goes, and at
    most ``capacity`` kept at once (the least recently used leaves first; never one in use).
    Names are checked before any path is built: letters, digits, ``_`` and ``-`` only, and the
    folder must resolve inside ``folder`` (a symlink out of it is refused)."""

    def __init__(
        self,
        named: Any,
        folder: Path | None,
        capacity: int,
        metrics: Metrics | None = None,
        fixed: list[str] | None = None,
    ):
        self.named, self.folder, self.capacity, self.metrics = named, folder, capacity, metrics
        self.fixed = list(named.names if fixed is None else fixed)
        self.changes = 0  # adapters attached or detached since the start
        self.loaded: OrderedDict[str, float] = OrderedDict(
            (n, _stamp(self.path(n))) for n in named.names if n not in self.fixed
        )
        self._count()

    def available(self) -> list[str]:
        """Every name a request may use now."""
        found = sorted(p.name for p in self.folder.iterdir() if self.path(p.name)) if self.folder else []
        return self.fixed + [n for n in found if n not in self.fixed]

    def path(self, name: str) -> Path | None:
        """The adapter folder ``name`` stands for under ``folder``, or None."""
        return served_path(self.folder, name) if self.folder else None

    def check(self, name: Any) -> str:
        """``name`` if a request may use it (cheap; on the event loop), else the 404."""
        if isinstance(name, str) and (name in self.fixed or self.path(name)):
            return name
        raise not_found(str(name), self.available())

    def ensure(self, name: str, busy: set[str]) -> None:
        """Make ``name`` loaded, on the worker thread; ``busy`` are adapters rows still use.

        Raises:
            ApiError: 404 where the folder has gone, 400 where it cannot be served.
        """
        if name in self.fixed:
            return
        path = self.path(name)
        if path is None:
            if name in self.loaded and name not in busy:
                self._unload(name)
            raise not_found(name, self.available())
        stamp = _stamp(path)
        if name in self.loaded:
            if self.loaded[name] == stamp or name in busy:
                self.loaded.move_to_end(name)
                return
            self._unload(name)  # its files changed: load them again
        try:
            self.named.attach(name, path)
        except PeftkitError as exc:
            raise ApiError(400, "invalid_request_error", f"adapter {name!r} cannot be served: {exc.what}") from None
        self.changes += 1
        self.loaded[name] = stamp
        for old in [n for n in self.loaded if n not in busy and n != name][: max(0, len(self.loaded) - self.capacity)]:
            self._unload(old)
        self._count()

    def _unload(self, name: str) -> None:
        self.named.detach(name)
        self.changes += 1
        del self.loaded[name]
        self._count()

    def _count(self) -> None:
        if self.metrics is not None:
            self.metrics.adapters.set(len(self.named.names))


def _stamp(path: Path | None) -> float:
    """When the adapter's files last changed (0 where there is no folder)."""
    return sum((path / f).stat().st_mtime_ns for f in (CONFIG_FILE, WEIGHTS_FILE)) if path else 0.0


def served_path(folder: Path, name: Any) -> Path | None:
    """``folder/name`` where ``name`` is a plain name (letters, digits, ``_``, ``-``) of a
    subfolder inside ``folder`` (symlinks resolved) that holds an adapter in safetensors."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        return None
    path = folder / name
    try:
        inside = path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return None
    return path if inside and (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file() else None


@dataclass
class Job:
    """One request waiting for the worker; ``deliver`` runs on the event loop."""

    adapter: str | None
    payload: Any
    loop: asyncio.AbstractEventLoop
    deliver: Any  # callable(value, error) on the event loop
    cancelled: bool = False

    def send(self, value: Any, error: BaseException | None = None) -> None:
        if not self.cancelled:
            self.loop.call_soon_threadsafe(self.deliver, value, error)


class Worker:
    """A bounded queue of jobs and the one thread that works through them: a thread of its own
    (``start``), or the caller's, which calls :meth:`run` (``peftkit serve`` gives it the main
    thread: torch runs its operator threads best from there)."""

    def __init__(self, store: AdapterStore, limits: Limits, metrics: Metrics | None = None, start: bool = True):
        self.store, self.limits, self.metrics = store, limits, metrics
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=limits.max_queue)
        self.thread = None
        if start:
            self.thread = threading.Thread(target=self.run, name=f"peftkit-{type(self).__name__.lower()}", daemon=True)
            self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue ``job``.

        Raises:
            ApiError: the queue is full (429).
        """
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(429, "rate_limit_error", "the server is busy; retry shortly", {"Retry-After": "1"}) from None
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.jobs.qsize())

    def depth(self) -> int:
        return self.jobs.qsize()

    def close(self) -> None:
        """Stop once the jobs queued so far are done."""
        self.jobs.put(None)
        if self.thread is not None:
            self.thread.join(timeout=30)

    def _ready(self, job: Job, busy: set[str]) -> bool:
        """Whether ``job`` can run: still wanted, its adapter loaded (else it gets the error)."""
        if job.cancelled:
            return False
        try:
            if job.adapter is not None:
                self.store.ensure(job.adapter, busy)
        except ApiError as exc:
            job.send(None, exc)
            return False
        return True

    def run(self) -> None:
        """Work until :meth:`close`."""
        raise NotImplementedError

    _trimmed = 0.0

    def _trim(self) -> None:
        """Every few seconds, hand the C heap's freed pages back to the system. Tensors of ever
        changing shapes leave glibc's heap fragmented and the process keeps what was freed:
        without this a server's memory grew 12% over a 5-minute soak (bench/serve_load.py)."""
        if _LIBC is not None and time.monotonic() - self._trimmed > TRIM_EVERY:
            _LIBC.malloc_trim(0)
            self._trimmed = time.monotonic()


class Batcher(Worker):
    """Classification: requests for any adapters gathered into mixed batches (``compute(texts,
    names)`` -> one probability row per text) under the time and size budget of ``limits``."""

    def __init__(
        self, compute: Any, store: AdapterStore, limits: Limits, metrics: Metrics | None = None, start: bool = True
    ):
        self.compute = compute
        super().__init__(store, limits, metrics, start)

    def _gather(self, first: Job) -> list[Job]:
        batch, size = [first], len(first.payload)
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
            size += len(job.payload)
        return batch

    def run(self) -> None:
        while (first := self.jobs.get()) is not None:
            gathered = self._gather(first)
            busy = {j.adapter for j in gathered}
            batch = [j for j in gathered if self._ready(j, busy)]
            if not batch:
                continue
            texts = [t for j in batch for t in j.payload]
            names = [j.adapter for j in batch for _ in j.payload]
            try:
                rows = self.compute(texts, names)
            except Exception as exc:  # every waiting request learns of it; the server keeps serving
                for j in batch:
                    j.send(None, exc)
                continue
            if self.metrics is not None:
                self.metrics.batch_size.observe(len(texts))
            start = 0
            for j in batch:
                j.send(rows[start : start + len(j.payload)])
                start += len(j.payload)
            self._trim()


@dataclass
class GenWork:
    """A generation request: what it asks (``render`` turns it into ``seq`` and ``stream`` on
    the worker, once its adapter is loaded)."""

    kind: str  # "chat" or "text"
    sampling: Any  # protocol.Sampling
    prompt: Any  # the text, or the chat messages
    raw: bool = False  # a completion's prompt sent as it is, not in the adapter's prompt format
    seq: Any = None  # generation.Sequence
    stream: Any = None  # TextStream


class Generator(Worker):
    """Generation with continuous batching. A job's payload is a :class:`GenWork`; it is sent
    ``(text delta, finish reason or None)`` as tokens come, until the finish reason. A job whose
    payload is a list of texts is scored (``score(texts, names)``: a reward adapter on the same
    base) between two decoding steps, on this thread, which alone uses the model.

    With ``limits.decode`` set, a batch whose rows all use one adapter (or all the base) decodes
    through prepared products with that adapter merged (:class:`peftkit.accel.DecodeProducts`,
    and its own decoding step for LLaMA models): made at that adapter's first batch and kept, one
    set at a time, until another adapter's batch or an adapter attached or detached. Batches of
    mixed adapters decode through the model as it is."""

    def __init__(
        self,
        named: Any,
        render: Any,
        store: AdapterStore,
        limits: Limits,
        metrics: Metrics | None = None,
        start: bool = True,
        score: Any = None,
    ):
        self.render = render  # (GenWork, adapter) -> (Sequence, TextStream), or ApiError
        self.score = score
        self.named = named
        self._products: tuple[tuple[str | None, int], Any] | None = None  # (adapter, store changes), products
        self._entered: Any = None
        self.decoder = StepDecoder(
            named.model, named.tokenizer.pad_token_id, around=self._around, decode_step=self._decode_step
        )
        super().__init__(store, limits, metrics, start)

    @contextlib.contextmanager
    def _around(self, names: list[str | None]):
        """Each row its adapter, and the batch's prepared products where there are some."""
        with self.named.adapters.per_row(names):
            products = self._prepared(names)
            if products is None:
                yield
                return
            with products:
                self._entered = products
                try:
                    yield
                finally:
                    self._entered = None

    def _decode_step(self) -> Any:
        entered = self._entered
        step = entered.step if entered is not None else None
        if self.metrics is not None:
            path = "model" if entered is None else "products_step" if step is not None else "products"
            self.metrics.decode_steps.labels(path).inc()
        return step

    def _prepared(self, names: list[str | None]) -> Any:
        """The products for a batch of one adapter's rows (see the class docstring), or None."""
        dtype = DECODE_DTYPES.get(self.limits.decode)
        if dtype is None or len(set(names)) != 1:
            return None
        key = (names[0], self.store.changes)
        if self._products is None or self._products[0] != key:
            from ..accel import DecodeProducts

            self._products = None  # the old set goes before the new one is made
            self._products = key, DecodeProducts(self.named.model, dtype, keep=True)
            if self.metrics is not None:
                self.metrics.prepared.inc()
        return self._products[1]

    def _admit(self, running: dict[int, Job]) -> tuple[list[Job], bool]:
        """New jobs for the free places (waiting for one only when nothing runs); and whether the
        server is stopping."""
        new: list[Job] = []
        while len(running) + len(new) < self.limits.max_batch:
            try:
                job = self.jobs.get() if not running and not new else self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return new, True
            if not self._ready(job, {j.adapter for j in [*running.values(), *new]}):
                continue
            if not isinstance(job.payload, GenWork):  # texts to score
                try:
                    job.send(self.score(job.payload, [job.adapter] * len(job.payload)))
                except Exception as exc:  # the request learns of it; the server keeps serving
                    job.send(None, exc)
                continue
            try:
                job.payload.seq, job.payload.stream = self.render(job.payload, job.adapter)
            except ApiError as exc:
                job.send(None, exc)
                continue
            new.append(job)
        return new, False

    def run(self) -> None:
        running: dict[int, Job] = {}  # id(sequence) -> its job
        stopping = False
        while not (stopping and not running):
            new: list[Job] = []
            if not stopping:
                new, stopping = self._admit(running)
                running.update((id(j.payload.seq), j) for j in new)
            try:
                if new:
                    self.decoder.add([j.payload.seq for j in new])
                    self._emit(running)
                if self.decoder.rows:
                    self.decoder.step()
                    self._emit(running)
            except Exception as exc:  # the running requests learn of it; the server keeps serving
                for j in running.values():
                    j.send(None, exc)
                self.decoder.drop(lambda _: True)
                running.clear()
            if self.metrics is not None:
                self.metrics.generating.set(len(running))
                self.metrics.queue_depth.set(self.jobs.qsize())

    def _emit(self, running: dict[int, Job]) -> None:
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(self.decoder.rows))
        for seq in self.decoder.rows:
            job = running[id(seq)]
            delta = job.payload.stream.update(seq.tokens, seq.finish is not None)
            if job.payload.stream.stopped:
                seq.finish = "stop"
            if delta or seq.finish:
                job.send((delta, seq.finish))
        for seq in self.decoder.drop(lambda s: s.finish is not None or running[id(s)].cancelled):
            del running[id(seq)]
            if self.metrics is not None:
                self.metrics.tokens.inc(len(seq.tokens))
        self._trim()


class TextStream:
    """The text of a growing list of tokens, handed out in pieces that are safe to send: never a
    half character, never the start of a stop string (the answer ends before a stop string)."""

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.sent = 0
        self.stopped = False

    def update(self, tokens: list[int], finished: bool) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            text, finished, self.stopped = text[:cut], True, True
        end = len(text)
        if not finished:
            if text.endswith("\ufffd"):  # a character whose bytes are not all decoded yet
                end -= 1
            held = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            end = max(self.sent, min(end, len(text) - held))
        delta, self.sent = text[self.sent : end], max(self.sent, end)
        return delta
