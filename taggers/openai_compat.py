"""Captions from an OpenAI-compatible chat-completions server: `openai:URL[#model]`.

Works with Ollama, vLLM, LM Studio, llama.cpp server and OpenAI itself. Images go as base64 JPEG
data URLs (resized to `max_side`); requests run in a bounded thread pool with timeouts and retries
(exponential backoff on 5xx, 429, timeouts and connection errors; other 4xx fail at once). The API
key comes from an environment variable and never appears in logs, errors, names or sidecars.
Standard library only (urllib).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from PIL import Image

from sdprep.dataset import loads_json
from sdprep.errors import ConfigError, ModelError
from sdprep.taggers.base import CAPTIONERS

log = logging.getLogger(__name__)

MAX_BACKOFF = 60.0


class _Cancelled(Exception):
    """A request not sent because an earlier one failed for good."""


MAX_ANSWER_BYTES = 16 << 20  # an answer larger than this is refused (read at most this much)


@dataclass(frozen=True)
class OpenAIOptions:
    """Options of `openai:` captioners (the keyword arguments of `load_captioner("openai:...", ...)`)."""

    model: str | None = None  # also `openai:URL#model`; Ollama/vLLM/OpenAI need one
    max_new_tokens: int = 300  # sent as max_tokens
    temperature: float = 0.0
    top_p: float = 1.0
    system_prompt: str | None = None
    api_key_env: str = "OPENAI_API_KEY"  # name of the environment variable holding the key
    concurrency: int = 4  # requests in flight
    timeout: float = 120.0  # seconds without an answer before a request counts as timed out
    retries: int = 3  # extra attempts after the first
    backoff: float = 1.0  # first retry delay in seconds, doubled each time
    max_side: int = 1024  # images are downscaled to this longest side before sending (0 = never)
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be at least 1"),
            (self.temperature >= 0, "temperature must be 0 or more"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.concurrency >= 1, "concurrency must be at least 1"),
            (self.timeout > 0, "timeout must be more than 0 seconds"),
            (self.retries >= 0, "retries must be 0 or more"),
            (self.backoff >= 0, "backoff must be 0 or more seconds"),
            (self.max_side >= 0, "max_side must be 0 (no resize) or a pixel size"),
            (1 <= self.jpeg_quality <= 100, "jpeg_quality must be in 1..100"),
            (
                bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env)),
                "api_key_env must be a variable name",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


class CaptionRequestError(ModelError):
    """A request failed for good. `index` is the image in the batch, `partial` the captions already done."""

    def __init__(self, message: str, hint: str | None = None, index: int = -1):
        super().__init__(message, hint)
        self.index = index
        self.partial: list[str | None] = []


class _Retry(Exception):
    """A transient failure (5xx, 429, timeout, connection): try again after a delay."""

    def __init__(self, reason: str, delay: float | None = None, timeout: bool = False):
        super().__init__(reason)
        self.reason, self.delay, self.timeout = reason, delay, timeout


def base_url(url: str) -> str:
    """The API base from a user URL: `http://host:11434` -> `http://host:11434/v1`; `/chat/completions` dropped."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            f'"{url}" is not an http(s) URL', "write e.g. openai:http://127.0.0.1:11434/v1#llava"
        )
    if parts.username or parts.password or parts.query:
        raise ConfigError(
            "the captioner URL must not contain credentials or a query string",
            "put the API key in an environment variable (api_key_env, default OPENAI_API_KEY)",
        )
    path = parts.path.rstrip("/")
    for suffix in ("/chat/completions", "/completions"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
    if not path:
        path = "/v1"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def encode_image(image: Image.Image, max_side: int = 1024, quality: int = 90) -> str:
    """A `data:image/jpeg;base64,...` URL; transparency goes onto white, the longest side <= max_side."""
    im = image
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA"):
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
        im = background
    elif im.mode != "RGB":
        im = im.convert("RGB")
    if max_side and max(im.size) > max_side:
        im = im.copy()
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class OpenAICaptioner:
    """Natural-language captions from an OpenAI-compatible `/chat/completions` endpoint."""

    def __init__(self, url: str, options: OpenAIOptions | None = None):
        address, _, fragment = url.partition("#")
        options = options or OpenAIOptions()
        fragment = urllib.parse.unquote(fragment).strip()
        if fragment and options.model and fragment != options.model:
            raise ConfigError(
                f'two model names given: "{fragment}" in the URL and "{options.model}" as an option'
            )
        self.base = base_url(address)
        self.model = options.model or fragment or None
        self.options = options
        self.name = f"openai:{self.base}" + (f"#{self.model}" if self.model else "")
        self.endpoint = self.base + "/chat/completions"
        self._api_key: str | None = None
        self._loaded = False

    def __repr__(self) -> str:
        return f"OpenAICaptioner({self.name!r})"

    @property
    def settings(self) -> dict[str, Any]:
        """Options that change the text (recorded with each caption)."""
        o = self.options
        out: dict[str, Any] = {"max_new_tokens": o.max_new_tokens, "temperature": o.temperature}
        if o.top_p < 1:
            out["top_p"] = o.top_p
        if o.system_prompt:
            out["system_prompt"] = o.system_prompt
        if o.max_side != OpenAIOptions.max_side:
            out["max_side"] = o.max_side
        return out

    def load(self) -> None:
        """Read the API key from the environment (no request is made)."""
        self._api_key = os.environ.get(self.options.api_key_env) or None
        self._loaded = True

    def _redact(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text

    def payload(self, image: Image.Image, prompt: str) -> dict[str, Any]:
        """The chat-completions request body for one image."""
        o = self.options
        content = [
            {"type": "image_url", "image_url": {"url": encode_image(image, o.max_side, o.jpeg_quality)}},
            {"type": "text", "text": prompt},
        ]
        messages: list[dict[str, Any]] = []
        if o.system_prompt:
            messages.append({"role": "system", "content": o.system_prompt})
        messages.append({"role": "user", "content": content})
        body: dict[str, Any] = {
            "messages": messages,
            "max_tokens": o.max_new_tokens,
            "temperature": o.temperature,
        }
        if self.model:
            body["model"] = self.model
        if o.top_p < 1:
            body["top_p"] = o.top_p
        return body

    def caption(self, images: list[Image.Image], prompts: list[str]) -> list[str]:
        """One caption per image, up to `concurrency` requests at a time, results in input order.

        The first request that fails for good cancels the rest and raises CaptionRequestError.
        """
        if len(images) != len(prompts):
            raise ConfigError(f"caption() got {len(images)} images but {len(prompts)} prompts")
        if not images:
            return []
        if not self._loaded:
            self.load()
        results: list[str | None] = [None] * len(images)
        stop = threading.Event()  # set by the first request that fails for good

        def one(image: Image.Image, prompt: str) -> str:
            if stop.is_set():  # a worker may pick the next request before the pool is shut down
                raise _Cancelled
            try:
                return self._one(image, prompt)
            except Exception:
                stop.set()
                raise

        pool = ThreadPoolExecutor(max_workers=min(self.options.concurrency, len(images)))
        try:
            futures = {pool.submit(one, im, p): i for i, (im, p) in enumerate(zip(images, prompts))}
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in sorted(done, key=futures.__getitem__):
                if future.exception() is None:
                    results[futures[future]] = future.result()
            failed: list[tuple[int, BaseException]] = []
            for f in done:
                exc = f.exception()
                if exc is not None and not isinstance(exc, _Cancelled):
                    failed.append((futures[f], exc))
            failed.sort(key=lambda x: x[0])
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        if failed:
            index, exc = failed[0]
            if isinstance(exc, CaptionRequestError):
                exc.index, exc.partial = index, results
            raise exc
        return [r or "" for r in results]

    def _one(self, image: Image.Image, prompt: str) -> str:
        data = json.dumps(self.payload(image, prompt)).encode("utf-8")
        o = self.options
        attempts = o.retries + 1
        for attempt in range(attempts):
            try:
                return self._post(data)
            except _Retry as exc:
                if attempt + 1 >= attempts:
                    raise self._gave_up(exc, attempts) from None
                delay = exc.delay if exc.delay is not None else o.backoff * 2**attempt
                delay = min(delay, MAX_BACKOFF)
                log.warning(
                    "%s: %s; retry %d/%d in %.1f s", self.name, exc.reason, attempt + 1, o.retries, delay
                )
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _gave_up(self, exc: _Retry, attempts: int) -> CaptionRequestError:
        tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
        if exc.timeout:
            return CaptionRequestError(
                f"{self.name}: no answer within {self.options.timeout:g} s ({tries})",
                "the server is busy or the model is still loading; raise the timeout or lower concurrency",
            )
        return CaptionRequestError(
            f"{self.name}: {exc.reason} ({tries})",
            "is the server running and the URL right? (e.g. `ollama serve` listens on http://127.0.0.1:11434/v1)",
        )

    def _post(self, data: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "sdprep"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.endpoint, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.options.timeout) as response:
                raw = response.read(MAX_ANSWER_BYTES + 1)
            if len(raw) > MAX_ANSWER_BYTES:  # a caption is a few KB: never hold an endless answer
                raise CaptionRequestError(
                    f"{self.name}: the answer is over {MAX_ANSWER_BYTES >> 20} MB, not a caption",
                    "is this URL an OpenAI-compatible API? it should accept POST .../v1/chat/completions",
                )
        except urllib.error.HTTPError as exc:
            raise self._http_error(exc) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise _Retry("timed out", timeout=True) from None
            raise _Retry(f"cannot connect to {self.base} ({self._reason(exc.reason)})") from None
        except TimeoutError:
            raise _Retry("timed out", timeout=True) from None
        except (http.client.HTTPException, ConnectionError) as exc:
            raise _Retry(f"connection to {self.base} failed ({self._reason(exc)})") from None
        return self._parse(raw)

    def _reason(self, reason: object) -> str:
        if isinstance(reason, OSError) and reason.strerror:
            return self._redact(reason.strerror)
        return self._redact(str(reason) or type(reason).__name__)

    def _http_error(self, exc: urllib.error.HTTPError) -> Exception:
        try:
            body = exc.read(64 << 10).decode("utf-8", "replace")  # the start says what went wrong
        except (OSError, http.client.HTTPException):
            body = ""
        detail = self._redact(_error_detail(body))
        status = f"HTTP {exc.code}" + (f": {detail}" if detail else "")
        if exc.code == 429 or exc.code >= 500:
            return _Retry(status, delay=_retry_after(exc.headers.get("Retry-After")))
        hints = {
            401: f"set a valid API key in the environment variable {self.options.api_key_env}",
            403: f"the key in {self.options.api_key_env} is not allowed to use this model",
            404: "check the URL (usually ending in /v1) and the model name",
            413: "the image is too large for the server; lower max_side",
        }
        hint = hints.get(exc.code, "check the request options")
        if exc.code in (400, 404, 422) and "model" in detail.lower():
            hint = "name the model with --vlm-model NAME or openai:URL#NAME (see the server's model list)"
        return CaptionRequestError(f"{self.name}: {status}", hint)

    def _parse(self, raw: bytes) -> str:
        try:
            answer = loads_json(raw)
            content = answer["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            snippet = self._redact(raw[:200].decode("utf-8", "replace"))
            raise CaptionRequestError(
                f"{self.name}: unexpected answer (not a chat completion): {snippet!r}",
                "is this URL an OpenAI-compatible API? it should accept POST .../v1/chat/completions",
            ) from None
        if isinstance(content, list):  # some servers answer with content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return (content or "").strip()


def _error_detail(body: str) -> str:
    """The message of an OpenAI-style error body, else the start of the body, on one line."""
    try:
        data = loads_json(body)
        error = data.get("error", data) if isinstance(data, dict) else data
        text = error.get("message", "") if isinstance(error, dict) else str(error)
    except ValueError:
        text = body
    return " ".join(str(text).split())[:300]


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


def create_openai(url: str, **options: Any) -> OpenAICaptioner:
    """Registry factory for `openai:URL[#model]`."""
    from sdprep.taggers.captioners import parse_options

    return OpenAICaptioner(url, parse_options(OpenAIOptions, options, "openai"))


CAPTIONERS.register("openai", create_openai)
