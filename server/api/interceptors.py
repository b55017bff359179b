"""gRPC server interceptors: the standard `grpc_server_*` metrics, the drain of a graceful stop,
and the log context of a call.

MetricsInterceptor exports what go-grpc-prometheus exports, with the same names, labels and label
values (grpc_code is "OK", "InvalidArgument", "Unavailable", ...), so the usual gRPC dashboards and
alerts work unchanged:

    grpc_server_started_total{grpc_type,grpc_service,grpc_method}
    grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}
    grpc_server_handling_seconds{grpc_type,grpc_service,grpc_method}    (histogram)
    grpc_server_msg_received_total / grpc_server_msg_sent_total{grpc_type,grpc_service,grpc_method}

Method labels come only from methods the server has registered: a call to an unknown method
(answered UNIMPLEMENTED by gRPC) is not counted, because its name is whatever the client sent.

DrainInterceptor lets a stopping server answer every call (see its docstring).

LogContextInterceptor puts the site id and settlement id of the request being handled on every log
record emitted while handling it (tracecode.server.logs adds them to the record).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Iterable, Iterator

import grpc
from google.protobuf import descriptor_pool
from prometheus_client import Counter, Histogram

from .. import logs
from .. import metrics  # noqa: F401 - first: its value class is set before any metric (metrics.CACHED_PID)

log = logging.getLogger("tracecode.rpc")

# Canonical status names as grpc-go spells them (codes.Code.String()).
CODE_NAMES = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}

_LABELS = ("grpc_type", "grpc_service", "grpc_method")
STARTED = Counter("grpc_server_started_total", "RPCs started on the server", _LABELS)
HANDLED = Counter("grpc_server_handled_total", "RPCs completed on the server, whatever their status",
                  _LABELS + ("grpc_code",))
# Finer than the client library's defaults at the low end (a settlement should take a few ms) and
# up to 10 s for issuance uploads and bulk streams.
HANDLING = Histogram("grpc_server_handling_seconds",
                     "Time the server spent on an RPC, from the handler's start to its last response",
                     _LABELS, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
MSG_RECEIVED = Counter("grpc_server_msg_received_total", "Request messages received by the server", _LABELS)
MSG_SENT = Counter("grpc_server_msg_sent_total", "Response messages sent by the server", _LABELS)

_TYPES = {(False, False): "unary", (True, False): "client_stream", (False, True): "server_stream",
          (True, True): "bidi_stream"}


def _final_code(context: grpc.ServicerContext, default: grpc.StatusCode) -> grpc.StatusCode:
    """The status the call ends with: what the handler set (set_code, abort), else `default`,
    unless the client is gone (cancelled, or its deadline passed) and so never gets that answer."""
    code = context.code()
    if code is not None:
        return code
    if not context.is_active():
        return grpc.StatusCode.DEADLINE_EXCEEDED if context.time_remaining() <= 0 else grpc.StatusCode.CANCELLED
    return default


class WrapCache:
    """An interceptor's wrapped handler per method, built once: intercept_service runs on every
    call, and rebuilding the wrapper each time (a method handler and closures per interceptor)
    cost a few percent of a settlement's CPU (docs/performance.md, issue 19). The entry is used
    only while the handler below is the very same object, so a changed registration is wrapped
    afresh. Bounded: only registered methods reach it (an unknown one has no handler)."""

    __slots__ = ("_by_method",)

    def __init__(self):
        self._by_method: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(self, method: str, handler: grpc.RpcMethodHandler, build) -> grpc.RpcMethodHandler:
        hit = self._by_method.get(method)
        if hit is not None and hit[0] is handler:
            return hit[1]
        wrapped = build()
        self._by_method[method] = (handler, wrapped)  # a race builds it twice: harmless
        return wrapped


class Chain(grpc.ServerInterceptor):
    """Several interceptors as one, in the same order (the first outermost), so gRPC's pipeline
    runs one level per call instead of one per interceptor (a continuation closure and two
    calls each). When every member declares `wraps_by_method` (its wrapped handler depends on the
    method and the handler below only, never on the call's metadata), the chain's result is kept
    per method as WrapCache does; otherwise it is composed afresh on every call."""

    def __init__(self, interceptors: Iterable[grpc.ServerInterceptor]):
        self._chain = tuple(interceptors)
        self._cacheable = all(getattr(i, "wraps_by_method", False) for i in self._chain)
        self._wrapped = WrapCache()

    def intercept_service(self, continuation, handler_call_details):
        base = continuation(handler_call_details)
        if base is None or not self._cacheable:
            return self._compose(base, handler_call_details)
        return self._wrapped.get(handler_call_details.method, base, lambda: self._compose(base, handler_call_details))

    def _compose(self, handler, details):
        for interceptor in reversed(self._chain):
            handler = interceptor.intercept_service(lambda _d, inner=handler: inner, details)
        return handler


def rewrap(handler: grpc.RpcMethodHandler, unary, streaming) -> grpc.RpcMethodHandler:
    """The same method with its behavior wrapped: unary(behavior, request_streaming) for handlers
    that return one response, streaming(behavior, request_streaming) for those that stream."""
    kw = {"request_deserializer": handler.request_deserializer,
          "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary, False), **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary, True), **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream, False), **kw)
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream, True), **kw)


class _Method:
    """The pre-bound metric children of one method (no label lookups on the hot path)."""

    __slots__ = ("path", "started", "handled", "handling", "received", "sent")

    def __init__(self, path: str, rpc_type: str):
        service, _, method = path.lstrip("/").rpartition("/")
        labels = (rpc_type, service, method)
        self.path = path
        self.started = STARTED.labels(*labels)
        self.handling = HANDLING.labels(*labels)
        self.received = MSG_RECEIVED.labels(*labels)
        self.sent = MSG_SENT.labels(*labels)
        self.handled = {code: HANDLED.labels(*labels, name) for code, name in CODE_NAMES.items()}

    def finish(self, code: grpc.StatusCode, start: float) -> None:
        elapsed = time.perf_counter() - start
        self.handling.observe(elapsed)
        self.handled[code].inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("rpc %s %s %.2f ms", self.path, CODE_NAMES[code], elapsed * 1000)


class _CountingIterator:
    """A request stream that counts the messages the handler takes from it."""

    def __init__(self, inner: Iterator, counter):
        self._inner, self._counter = inner, counter

    def __iter__(self):
        return self

    def __next__(self):
        msg = next(self._inner)
        self._counter.inc()
        return msg


class MetricsInterceptor(grpc.ServerInterceptor):
    wraps_by_method = True  # Chain may keep its result per method
    def __init__(self, service_names: Iterable[str] = ()):
        """service_names: fully qualified services whose series are created at 0 up front (every
        method, every status code), so rate() and increase() see the first event of each."""
        self._methods: dict[str, _Method] = {}
        self._wrapped = WrapCache()
        pool = descriptor_pool.Default()
        for name in service_names:
            for m in pool.FindServiceByName(name).methods:
                path = f"/{name}/{m.name}"
                self._methods[path] = _Method(path, _TYPES[m.client_streaming, m.server_streaming])

    def _method(self, path: str, handler: grpc.RpcMethodHandler) -> _Method:
        m = self._methods.get(path)
        if m is None:  # a registered method not declared up front; still a bounded set
            m = self._methods[path] = _Method(path, _TYPES[handler.request_streaming, handler.response_streaming])
        return m

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        path = handler_call_details.method
        return self._wrapped.get(path, handler, lambda: self._wrap(path, handler))

    def _wrap(self, path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        m = self._method(path, handler)
        return rewrap(handler, lambda b, rs: _unary(m, b, rs), lambda b, rs: _streaming(m, b, rs))


def _unary(m: _Method, behavior, request_streaming: bool):
    """Wrap a handler that returns one response."""
    def handle(request, context):
        m.started.inc()
        if request_streaming:
            request = _CountingIterator(request, m.received)
        else:
            m.received.inc()
        start = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN
        try:
            response = behavior(request, context)
            code = _final_code(context, grpc.StatusCode.OK)
            if code is grpc.StatusCode.OK:
                m.sent.inc()
            return response
        except BaseException:
            code = _final_code(context, grpc.StatusCode.UNKNOWN)  # aborts set their code first
            raise
        finally:
            m.finish(code, start)
    return handle


def _streaming(m: _Method, behavior, request_streaming: bool):
    """Wrap a handler that streams responses: a generator, or a non-blocking handler that sends
    through a callback (grpc's experimental API, used by the health service's Watch)."""
    if getattr(behavior, "experimental_non_blocking", False):
        return _non_blocking(m, behavior, request_streaming)

    def handle(request, context):
        m.started.inc()
        if request_streaming:
            request = _CountingIterator(request, m.received)
        else:
            m.received.inc()
        start = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN
        try:
            for response in behavior(request, context) or ():
                m.sent.inc()
                yield response
            code = _final_code(context, grpc.StatusCode.OK)
        except GeneratorExit:
            # gRPC stopped pulling responses: the client cancelled or its deadline passed.
            code = _final_code(context, grpc.StatusCode.CANCELLED)
            raise
        except BaseException:
            code = _final_code(context, grpc.StatusCode.UNKNOWN)
            raise
        finally:
            m.finish(code, start)
    return handle


def _non_blocking(m: _Method, behavior, request_streaming: bool):
    def handle(request, context, send_response_callback):
        m.started.inc()
        if request_streaming:
            request = _CountingIterator(request, m.received)
        else:
            m.received.inc()
        start = time.perf_counter()
        outcome = []  # how the handler itself ended the stream, if it did

        def send(response):
            if response is None:
                outcome.append(grpc.StatusCode.OK)
            else:
                m.sent.inc()
            send_response_callback(response)

        def on_termination():
            # Runs once when the RPC terminates for any reason; if the handler did not end the
            # stream (a None response, or an exception), the client did.
            default = outcome[0] if outcome else (
                grpc.StatusCode.DEADLINE_EXCEEDED if context.time_remaining() <= 0 else grpc.StatusCode.CANCELLED)
            m.finish(context.code() or default, start)

        if not context.add_callback(on_termination):
            m.finish(grpc.StatusCode.CANCELLED, start)  # terminated before the handler ran
            return None
        try:
            return behavior(request, context, send)
        except BaseException:
            outcome.append(grpc.StatusCode.UNKNOWN)  # an abort's own code still wins in on_termination
            raise

    # grpc's own markers for a non-blocking handler, set as attributes on the function.
    setattr(handle, "experimental_non_blocking", True)  # noqa: B010
    setattr(handle, "experimental_thread_pool", getattr(behavior, "experimental_thread_pool", None))  # noqa: B010
    return handle


# ---------------------------------------------------------------------- drain

class DrainInterceptor(grpc.ServerInterceptor):
    """The first half of a graceful stop, before gRPC's own.

    gRPC's stop(grace) lets the calls its Python handlers have taken finish, but cancels the calls
    the core has received and not yet handed to Python: under load those clients get CANCELLED,
    which a POS does not retry. So the server drains here first: once draining, a new call to one
    of `services` is answered UNAVAILABLE at once (the POS retries it, same settlement id, on
    another server or later), and settle() waits until the calls that started before have ended
    and no call has arrived for a moment, i.e. the core holds none either. Only then is gRPC
    stopped. Health and reflection are not drained: a health check must keep answering NOT_SERVING.
    """

    wraps_by_method = True  # Chain may keep its result per method

    def __init__(self, services: Iterable[str]):
        self._prefixes = tuple(f"/{s}/" for s in services)
        # Every call enters and leaves under the plain lock (C-level `with`; a Condition's own
        # __enter__/__exit__ are Python calls); settle() waits on a Condition over the same lock.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._draining = False
        self._active = 0
        self._last = 0.0  # time.monotonic() of the latest call to reach us
        self._wrapped = WrapCache()

    @property
    def active(self) -> int:
        return self._active

    def begin(self) -> None:
        with self._cond:
            self._draining = True

    def settle(self, deadline: float, quiet: float = 0.1) -> bool:
        """Wait until no drained call runs and none has arrived for `quiet` seconds (True), or
        until time.monotonic() reaches `deadline` (False)."""
        with self._cond:
            while True:
                now = time.monotonic()
                if self._active == 0 and now - self._last >= quiet:
                    return True
                if now >= deadline:
                    return False
                wake = deadline if self._active else min(deadline, self._last + quiet)
                self._cond.wait(wake - now)

    def _enter(self, context) -> None:
        with self._lock:
            self._last = time.monotonic()
            if not self._draining:
                self._active += 1
                return
        context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down: retry with the same settlement id")

    def _exit(self) -> None:
        with self._lock:
            self._active -= 1
            if self._active == 0:
                self._cond.notify_all()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefixes):
            return handler
        return self._wrapped.get(handler_call_details.method, handler,
                                 lambda: rewrap(handler, lambda b, _: self._unary(b), lambda b, _: self._streaming(b)))

    def _unary(self, behavior):
        def handle(request, context):
            self._enter(context)
            try:
                return behavior(request, context)
            finally:
                self._exit()
        return handle

    def _streaming(self, behavior):
        def handle(request, context):
            self._enter(context)
            try:
                yield from behavior(request, context) or ()
            finally:
                self._exit()
        return handle


# ---------------------------------------------------------------------- log context


def _ids(request) -> tuple[str, str]:
    return getattr(request, "site_id", ""), getattr(request, "settlement_id", "")


class LogContextInterceptor(grpc.ServerInterceptor):
    """Sets the log context (tracecode.server.logs) from a request's `site_id` / `settlement_id`
    fields. Unary calls only: a stream carries many settlements (or none: health Watch), so there
    is no single one to name."""

    wraps_by_method = True  # Chain may keep its result per method

    def __init__(self):
        self._wrapped = WrapCache()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler.unary_unary:
            return handler
        path = handler_call_details.method
        return self._wrapped.get(path, handler, lambda: rewrap(handler, lambda b, _: _with_context(b, path), None))


def _with_context(behavior, path: str):
    def handle(request, context):
        with logs.call_context(*_ids(request)):
            try:
                return behavior(request, context)
            except Exception:
                if context.code() is None:
                    # An unexpected error (not a mapped status): say here which settlement it hit,
                    # since gRPC's own log line about it comes after the context is gone.
                    log.error("unhandled error in %s", path, exc_info=True)
                raise
    return handle
