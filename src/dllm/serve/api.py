"""The OpenAI-compatible HTTP API (Starlette, served by uvicorn in a thread of root).

POST /v1/completions, /v1/chat/completions (JSON, or server-sent events with stream: true),
GET /v1/models, /health, /metrics. Errors are OpenAI's shape, {"error": {"message", "type",
"param", "code"}}, with 400 (bad field, malformed JSON, prompt too long), 401 (--api-key),
404, 413 (body over --max-body), 429 (queue full, with Retry-After).

Only this thread touches the tokenizer (encoding prompts, decoding replies, stop strings);
the engine thread hands it token ids through an asyncio queue per request.
"""
import asyncio
import json
import math
import time
import uuid

from ..errors import DllmError
from ..tokenizer import TextStream
from .sampling import RequestSampler
from .scheduler import Sequence

MAX_LOGPROBS = 20
MAX_STOPS = 4
DISCONNECT_POLL = 0.05     # seconds between checks that a non-streaming client is still there
TOKEN_CONTEXT = 8          # preceding tokens decoded with one to spell it (see token_text)


class ApiError(Exception):
    def __init__(self, status, message, param=None, code=None, kind=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}


class ServerState:
    """What the handlers share: set up by dllm.serve.__main__ on root."""

    def __init__(self, scheduler, tokenizer, chat, metrics, model_name, max_seq_len,
                 api_key=None, max_body=1 << 20):
        self.scheduler, self.tokenizer, self.chat = scheduler, tokenizer, chat
        self.metrics, self.model_name, self.max_seq_len = metrics, model_name, max_seq_len
        self.api_key, self.max_body = api_key, max_body
        self.created = int(time.time())


def make_app(state):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    def guarded(handler, auth=True):
        async def endpoint(request):
            try:
                if auth:
                    authorize(state, request)
                return await handler(state, request)
            except ApiError as exc:
                if exc.status in (400, 413, 429):
                    state.metrics.requests["rejected" if exc.status == 429 else "bad"] += 1
                return error_response(exc)
        return endpoint

    async def health(state, request):
        return JSONResponse({"status": "ok"})

    async def metrics(state, request):
        return PlainTextResponse(state.metrics.render(state.scheduler.snapshot()),
                                 media_type="text/plain; version=0.0.4")

    async def models(state, request):
        return JSONResponse({"object": "list", "data": [
            {"id": state.model_name, "object": "model", "created": state.created,
             "owned_by": "dllm", "max_model_len": state.max_seq_len}]})

    async def not_found(request, exc):
        return error_response(ApiError(getattr(exc, "status_code", 404),
                                       f"no route {request.method} {request.url.path}"))

    routes = [Route("/health", guarded(health, auth=False)),
              Route("/metrics", guarded(metrics, auth=False)),
              Route("/v1/models", guarded(models)),
              Route("/v1/completions", guarded(completions), methods=["POST"]),
              Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def error_response(exc):
    from starlette.responses import JSONResponse
    return JSONResponse({"error": {"message": exc.message, "type": exc.kind,
                                   "param": exc.param, "code": exc.code}},
                        status_code=exc.status, headers=exc.headers)


def authorize(state, request):
    if state.api_key is None:
        return
    if request.headers.get("authorization", "") != f"Bearer {state.api_key}":
        raise ApiError(401, "invalid or missing API key (Authorization: Bearer ...)",
                       code="invalid_api_key")


async def read_json(state, request):
    """The request body as a JSON object, at most state.max_body bytes."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > state.max_body:
        raise ApiError(413, f"request body of {length} bytes exceeds {state.max_body}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > state.max_body:
            raise ApiError(413, f"request body exceeds {state.max_body} bytes")
    try:
        data = json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    return data


# --- fields -------------------------------------------------------------------------------

def number(body, name, default, low=None, high=None, integer=False, nullable=True):
    value = body.get(name, default)
    if value is None and nullable:
        return default
    ok = (isinstance(value, int) if integer else isinstance(value, (int, float)))
    if not ok or isinstance(value, bool) or (not integer and not math.isfinite(value)):
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}",
                       param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ApiError(400, f"'{name}' must be {bounds}, got {value}", param=name)
    return value


def flag(body, name, default=False):
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false", param=name)
    return value


def stop_strings(body):
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most "
                            f"{MAX_STOPS} of them", param="stop")
    return stops


def sampling(body):
    """A RequestSampler of the request's fields (OpenAI's defaults: temperature 1, top_p 1)."""
    if number(body, "n", 1, integer=True) != 1:
        raise ApiError(400, "'n' must be 1: dllm returns one choice per request", param="n")
    try:
        return RequestSampler(temperature=number(body, "temperature", 1.0, 0, 2),
                              top_p=number(body, "top_p", 1.0, 0, 1),
                              seed=number(body, "seed", None, 0, 2 ** 63 - 1, integer=True),
                              top_k=number(body, "top_k", 0, -1, integer=True),
                              min_p=number(body, "min_p", 0.0, 0, 1))
    except DllmError as exc:          # top_p 0
        raise ApiError(400, str(exc).replace("--top-p", "'top_p'"), param="top_p") from None


def check_prompt_ids(state, ids, name="prompt"):
    if not ids:
        raise ApiError(400, f"'{name}' is empty", param=name)
    vocab = state.tokenizer.vocab_size
    if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab for t in ids):
        raise ApiError(400, f"'{name}' holds a token id outside the vocabulary of {vocab}",
                       param=name)
    if len(ids) > state.max_seq_len:
        raise ApiError(400, f"the prompt is {len(ids)} tokens, more than the context of "
                            f"{state.max_seq_len} tokens", param=name,
                       code="context_length_exceeded")
    return ids


def completion_prompt(state, body):
    """Prompt ids of a legacy completion: a string, or a list of token ids (one prompt)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return check_prompt_ids(state, state.tokenizer.encode(prompt, bos=True))
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return check_prompt_ids(state, prompt)
    raise ApiError(400, "'prompt' must be a string or a list of token ids (one prompt)",
                   param="prompt")


def chat_messages(body):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, "each message needs a 'role' of system, user or assistant",
                           param="messages")
        content = m.get("content")
        if isinstance(content, list):     # [{"type": "text", "text": ...}]
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, "message content parts must be text", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, "each message needs a string 'content'", param="messages")
        out.append({"role": m["role"], "content": content})
    return out


# --- the endpoints --------------------------------------------------------------------------

async def completions(state, request):
    body = await read_json(state, request)
    prompt_ids = completion_prompt(state, body)
    echo = flag(body, "echo")
    logprobs = number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
    max_tokens = number(body, "max_tokens", 16, 0, integer=True)
    if max_tokens == 0 and not echo:
        raise ApiError(400, "'max_tokens' 0 asks for nothing unless 'echo' is true",
                       param="max_tokens")
    job = Job(state, "text_completion", prompt_ids, max_tokens, sampling(body),
              stop_strings(body), logprobs, echo,
              set() if flag(body, "ignore_eos") else {state.tokenizer.eos_id})
    return await job.respond(request, flag(body, "stream"), include_usage(body))


async def chat_completions(state, request):
    body = await read_json(state, request)
    messages = chat_messages(body)
    try:
        prompt_ids = state.chat.prompt_ids(messages)
    except DllmError as exc:
        raise ApiError(400, str(exc), param="messages") from None
    check_prompt_ids(state, prompt_ids, "messages")
    logprobs = None
    if flag(body, "logprobs"):
        logprobs = number(body, "top_logprobs", 0, 0, MAX_LOGPROBS, integer=True)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = number({"max_tokens": limit}, "max_tokens", state.max_seq_len, 1,
                        integer=True)
    job = Job(state, "chat.completion", prompt_ids, max_tokens, sampling(body),
              stop_strings(body), logprobs, False,
              set() if flag(body, "ignore_eos") else state.chat.stop_ids)
    return await job.respond(request, flag(body, "stream"), include_usage(body))


def include_usage(body):
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    return flag(options, "include_usage")


class Job:
    """One request: its sequence in the scheduler and the text and log-probabilities made
    of the ids the engine sends back."""

    def __init__(self, state, kind, prompt_ids, max_tokens, sampler, stops, logprobs, echo,
                 stop_ids):
        self.state, self.kind, self.prompt_ids, self.echo = state, kind, prompt_ids, echo
        self.logprobs, self.stops = logprobs, stops
        self.id = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.stop_ids = frozenset(i for i in stop_ids if i is not None and i >= 0)
        self.seq = Sequence(list(prompt_ids), max_tokens, sampler,
                            lambda what, payload: loop.call_soon_threadsafe(
                                self.queue.put_nowait, (what, payload)),
                            stop_ids=self.stop_ids, logprobs=logprobs,
                            echo_logprobs=echo and logprobs is not None)
        self.stream = TextStream(state.tokenizer, prompt_ids)
        self.text = StopText(stops)
        self.tokens, self.token_lps = [], []      # generated ids and their (lp, top)
        self.prompt_lps = []
        self.finish_reason = None

    def submit(self):
        if not self.state.scheduler.submit(self.seq):
            raise ApiError(429, "the request queue is full; retry shortly",
                           code="queue_full", kind="rate_limit_error",
                           headers={"Retry-After": "1"})
        self.state.metrics.prompt_tokens += len(self.prompt_ids)

    async def events(self):
        """Text deltas (str) as the tokens arrive, until the sequence finishes."""
        while self.finish_reason is None:
            what, payload = await self.queue.get()
            if what == "prompt_logprobs":
                self.prompt_lps += payload
            elif what == "token":
                token = payload[0]
                self.tokens.append(token)
                self.token_lps.append(payload[1:])
                new = "" if token in self.stop_ids else self.stream.push(token)
                delta, stopped = self.text.add(new)
                if stopped:
                    self.finish_reason = "stop"
                    self.state.scheduler.cancel(self.seq)
                if delta:
                    yield delta
            elif what == "done":
                self.finish_reason = payload
            elif what == "error":
                raise ApiError(500, payload)
        rest = self.text.flush()
        if rest:
            yield rest

    async def respond(self, request, stream, usage):
        self.submit()
        if stream:
            from starlette.responses import StreamingResponse
            return StreamingResponse(self.sse(usage), media_type="text/event-stream")
        try:
            task = asyncio.ensure_future(self._collect())
            while not task.done():
                await asyncio.wait([task], timeout=DISCONNECT_POLL)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    from starlette.responses import Response
                    return Response(status_code=499)      # nobody reads it: nginx's code
            text = task.result()
        finally:
            self.state.scheduler.cancel(self.seq)     # a no-op once it finished
        from starlette.responses import JSONResponse
        self.state.metrics.requests["ok"] += 1
        return JSONResponse(self.whole(text))

    async def _collect(self):
        return "".join([delta async for delta in self.events()])

    # --- response bodies ------------------------------------------------------------------
    def usage(self):
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": len(self.tokens),
                "total_tokens": len(self.prompt_ids) + len(self.tokens)}

    def whole(self, text):
        if self.kind == "text_completion":
            prefix = self.state.tokenizer.decode(self.prompt_ids) if self.echo else ""
            choice = {"index": 0, "text": prefix + text, "logprobs": self.completion_logprobs(),
                      "finish_reason": self.finish_reason}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": self.chat_logprobs(0), "finish_reason": self.finish_reason}
        return {"id": self.id, "object": self.kind, "created": self.created,
                "model": self.state.model_name, "choices": [choice], "usage": self.usage()}

    async def sse(self, usage):
        kind = "text_completion" if self.kind == "text_completion" else "chat.completion.chunk"
        sent_tokens = 0

        def chunk(delta, finish=None, lp_from=0):
            if self.kind == "text_completion":
                choice = {"index": 0, "text": delta, "finish_reason": finish,
                          "logprobs": self.completion_logprobs(lp_from)}
            else:
                choice = {"index": 0, "delta": delta, "finish_reason": finish,
                          "logprobs": self.chat_logprobs(lp_from)}
            return event({"id": self.id, "object": kind, "created": self.created,
                          "model": self.state.model_name, "choices": [choice]})
        try:
            if self.kind != "text_completion":
                yield chunk({"role": "assistant", "content": ""})
            elif self.echo:
                yield chunk(self.state.tokenizer.decode(self.prompt_ids))
            async for delta in self.events():
                yield chunk(delta if self.kind == "text_completion" else {"content": delta},
                            lp_from=sent_tokens)
                sent_tokens = len(self.tokens)
            yield chunk("" if self.kind == "text_completion" else {}, self.finish_reason,
                        lp_from=sent_tokens)
            if usage:
                yield event({"id": self.id, "object": kind, "created": self.created,
                             "model": self.state.model_name, "choices": [],
                             "usage": self.usage()})
            yield "data: [DONE]\n\n"
            self.state.metrics.requests["ok"] += 1
        except ApiError as exc:
            yield event({"error": {"message": exc.message, "type": exc.kind,
                                   "param": None, "code": None}})
        finally:               # also when the client went away (the task is cancelled)
            self.state.scheduler.cancel(self.seq)

    def completion_logprobs(self, start=0):
        """Legacy completions' {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
        of the generated tokens from `start` (with echo, the prompt's first)."""
        if self.logprobs is None:
            return None
        ids, lps = list(self.tokens[start:]), list(self.token_lps[start:])
        context = self.prompt_ids + self.tokens[:start]
        if self.echo and start == 0:
            ids, lps, context = self.prompt_ids + ids, self.prompt_lps + lps, []
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        tok = self.state.tokenizer
        # offsets into the choice's whole text (the prompt's first, with echo)
        offset = len(tok.decode(self.prompt_ids)) if self.echo else 0
        if context:
            offset += len(tok.decode(context)) - len(tok.decode(self.prompt_ids))
        for token, (lp, top) in zip(ids, lps):
            text = token_text(tok, context, token)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(None if top is None else
                                       {token_text(tok, context, i): v for i, v in top})
            out["text_offset"].append(offset)
            offset += len(text)
            context = context + [token]
        return out

    def chat_logprobs(self, start=0):
        if self.logprobs is None:
            return None
        tok, context, content = self.state.tokenizer, self.prompt_ids + self.tokens[:start], []
        for token, (lp, top) in zip(self.tokens[start:], self.token_lps[start:]):
            text = token_text(tok, context, token)
            content.append({"token": text, "logprob": lp, "bytes": list(text.encode()),
                            "top_logprobs": [
                                {"token": t, "logprob": v, "bytes": list(t.encode())}
                                for t, v in ((token_text(tok, context, i), v)
                                             for i, v in top or [])]})
            context = context + [token]
        return {"content": content}


def token_text(tokenizer, context, token):
    """How token reads after context: the text it adds to the last few tokens' decoding."""
    before = context[-TOKEN_CONTEXT:]
    return tokenizer.decode(before + [token])[len(tokenizer.decode(before)):]


def event(obj):
    return f"data: {json.dumps(obj)}\n\n"


class StopText:
    """The reply's text with stop strings cut off: text that might begin a stop string is
    held back until it is known not to."""

    def __init__(self, stops):
        self.stops, self.text, self.sent = stops, "", 0

    def add(self, new):
        """(text that may be sent now, whether a stop string ended the reply)."""
        self.text += new
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            delta, self.sent = self.text[self.sent:], len(self.text)
            return delta, True
        hold = max([k for s in self.stops for k in range(1, len(s))
                    if self.text.endswith(s[:k])], default=0)
        safe = max(self.sent, len(self.text) - hold)
        delta, self.sent = self.text[self.sent:safe], safe
        return delta, False

    def flush(self):
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta
