"""openai: captioners against a loopback HTTP server speaking the chat-completions protocol."""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import threading
from dataclasses import dataclass, field

import pytest
from loopback import Loopback, Request, Response
from PIL import Image

from sdprep.dataset import sdprep_meta
from sdprep.errors import ConfigError
from sdprep.taggers.captioners import load_captioner
from sdprep.taggers.captions_text import caption_record, clean_caption, combine_caption
from sdprep.taggers.openai_compat import CaptionRequestError, base_url, encode_image

KEY_ENV = "SDPREP_TEST_VLM_KEY"
KEY = "sk-planted-SECRET-4f9c2e7d1b"


@dataclass
class Reply:
    status: int = 200
    body: dict | str | None = None  # None: a chat completion echoing the prompt
    delay: float = 0.0
    headers: dict = field(default_factory=dict)


class FakeServer:
    """Answers POST /v1/chat/completions; scripted replies first, then echo answers."""

    def __init__(self):
        self.script: list[Reply] = []
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.hold = 0.0  # seconds every default answer waits (to observe concurrency)
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def next_reply(self) -> Reply:
        with self.lock:
            return self.script.pop(0) if self.script else Reply(delay=self.hold)

    def answer(self, request: Request) -> Response:
        """POST /v1/chat/completions: the next scripted reply, else the prompt echoed back."""
        body = request.json()
        with self.lock:
            self.requests.append({"path": request.path, "headers": dict(request.headers), "json": body})
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            reply = self.next_reply()
            if reply.delay:
                self.stop.wait(reply.delay)
            if reply.body is None:
                prompt = body["messages"][-1]["content"][1]["text"]
                echo = {
                    "choices": [{"message": {"role": "assistant", "content": f"The image shows {prompt}"}}]
                }
                return Response.json(reply.status, echo, reply.headers)
            if isinstance(reply.body, str):
                return Response(reply.status, reply.body.encode(), headers=reply.headers)
            return Response.json(reply.status, reply.body, reply.headers)
        finally:
            with self.lock:
                self.in_flight -= 1


@pytest.fixture
def server():
    state = FakeServer()
    loopback = Loopback(state.answer)
    state.url = loopback.url
    yield state
    state.stop.set()
    loopback.close()


def fast(**options):
    return {"timeout": 2.0, "retries": 2, "backoff": 0.0, **options}


def pictures() -> list[Image.Image]:
    return [Image.new("RGB", (640, 480), (200, 30, 30)), Image.new("RGBA", (90, 300), (0, 0, 255, 100))]


def decode_data_url(url: str) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :])))


def test_request_format_and_order(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    cap = load_captioner(f"openai:{server.url}#llava:7b", api_key_env=KEY_ENV, max_side=256, **fast())
    assert cap.name == f"openai:{server.url}/v1#llava:7b"
    out = cap.caption(pictures(), ["first prompt", "second prompt"])
    assert out == ["The image shows first prompt", "The image shows second prompt"]
    assert len(server.requests) == 2
    for request in server.requests:
        assert request["path"] == "/v1/chat/completions"  # /v1 added to a bare host URL
        assert request["headers"]["Authorization"] == f"Bearer {KEY}"
        assert request["headers"]["Content-Type"] == "application/json"
        body = request["json"]
        assert body["model"] == "llava:7b"
        assert body["max_tokens"] == 300 and body["temperature"] == 0.0
        image_part, text_part = body["messages"][0]["content"]
        assert image_part["type"] == "image_url" and text_part["type"] == "text"
        sent = decode_data_url(image_part["image_url"]["url"])
        assert sent.format == "JPEG" and sent.mode == "RGB" and max(sent.size) == 256
    sizes = {r["json"]["messages"][0]["content"][1]["text"]: r["json"] for r in server.requests}
    assert decode_data_url(sizes["first prompt"]["messages"][0]["content"][0]["image_url"]["url"]).size == (
        256,
        192,
    )


def test_system_prompt_model_option_and_no_key(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cap = load_captioner(
        f"openai:{server.url}/v1/", model="qwen2.5vl", system_prompt="Be brief.", top_p=0.5, **fast()
    )
    assert cap.caption(pictures()[:1], ["p"]) == ["The image shows p"]
    request = server.requests[0]
    assert "Authorization" not in request["headers"]
    assert request["json"]["model"] == "qwen2.5vl" and request["json"]["top_p"] == 0.5
    assert request["json"]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert cap.settings == {
        "max_new_tokens": 300,
        "temperature": 0.0,
        "top_p": 0.5,
        "system_prompt": "Be brief.",
    }


def test_500_is_retried_then_succeeds(server, caplog):
    server.script = [Reply(500, {"error": {"message": "model is loading"}})]
    cap = load_captioner(f"openai:{server.url}/v1#m", **fast())
    with caplog.at_level(logging.WARNING, logger="sdprep.taggers.openai_compat"):
        assert cap.caption(pictures()[:1], ["hello"]) == ["The image shows hello"]
    assert len(server.requests) == 2
    assert f"openai:{server.url}/v1#m: HTTP 500: model is loading; retry 1/2 in 0.0 s" in caplog.text


def test_429_is_retried_with_retry_after(server):
    server.script = [Reply(429, {"error": {"message": "slow down"}}, headers={"Retry-After": "0"})]
    cap = load_captioner(f"openai:{server.url}#m", **fast(backoff=30.0))  # Retry-After 0 wins
    assert cap.caption(pictures()[:1], ["x"]) == ["The image shows x"]
    assert len(server.requests) == 2


def test_timeout_is_retried_then_reported(server):
    server.script = [Reply(delay=5.0), Reply(delay=5.0)]
    cap = load_captioner(f"openai:{server.url}/v1#m", timeout=0.5, retries=1, backoff=0.0)
    with pytest.raises(CaptionRequestError) as err:
        cap.caption(pictures()[:1], ["x"])
    assert err.value.message == f"openai:{server.url}/v1#m: no answer within 0.5 s (2 attempts)"
    assert "raise the timeout" in err.value.hint
    assert len(server.requests) == 2
    assert err.value.index == 0 and err.value.partial == [None]


def test_4xx_is_not_retried(server):
    server.script = [Reply(404, {"error": {"message": 'model "lava" not found, try pulling it first'}})]
    cap = load_captioner(f"openai:{server.url}/v1#lava", **fast())
    with pytest.raises(CaptionRequestError) as err:
        cap.caption(pictures()[:1], ["x"])
    assert err.value.message == (
        f'openai:{server.url}/v1#lava: HTTP 404: model "lava" not found, try pulling it first'
    )
    assert err.value.hint.startswith("name the model with --vlm-model NAME or openai:URL#NAME")
    assert len(server.requests) == 1


def test_one_failure_cancels_the_rest_and_keeps_partial_results(server):
    server.script = [Reply(), Reply(400, {"error": {"message": "bad image"}})]
    cap = load_captioner(f"openai:{server.url}#m", concurrency=1, **fast())
    with pytest.raises(CaptionRequestError) as err:
        cap.caption(pictures() + pictures()[:1], ["a", "b", "c"])
    assert err.value.message == f"openai:{server.url}/v1#m: HTTP 400: bad image"
    assert err.value.index == 1
    assert err.value.partial == ["The image shows a", None, None]
    assert len(server.requests) == 2  # the third request was never sent


def test_connection_refused_is_retried_then_reported():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    cap = load_captioner(f"openai:http://127.0.0.1:{port}/v1#m", retries=1, backoff=0.0, timeout=0.5)
    with pytest.raises(CaptionRequestError) as err:
        cap.caption(pictures()[:1], ["x"])
    assert err.value.message.startswith(f"openai:http://127.0.0.1:{port}/v1#m: cannot connect to")
    assert err.value.message.endswith("(2 attempts)")
    assert "is the server running" in err.value.hint


def test_not_a_chat_completion(server):
    server.script = [Reply(200, "<html>hello</html>")]
    cap = load_captioner(f"openai:{server.url}#m", **fast())
    with pytest.raises(CaptionRequestError, match="unexpected answer") as err:
        cap.caption(pictures()[:1], ["x"])
    assert "<html>hello</html>" in err.value.message


def test_a_json_bomb_answer_is_an_unexpected_answer_not_a_crash(server):
    server.script = [Reply(200, "[" * 100_000 + "]" * 100_000)]
    cap = load_captioner(f"openai:{server.url}#m", **fast())
    with pytest.raises(CaptionRequestError, match="unexpected answer"):
        cap.caption(pictures()[:1], ["x"])


def test_an_endless_answer_is_cut_off_not_held(server, monkeypatch):
    from sdprep.taggers import openai_compat

    monkeypatch.setattr(openai_compat, "MAX_ANSWER_BYTES", 1000)
    server.script = [Reply(200, "x" * 5000)]
    cap = load_captioner(f"openai:{server.url}#m", **fast())
    with pytest.raises(CaptionRequestError, match="the answer is over 0 MB, not a caption"):
        cap.caption(pictures()[:1], ["x"])


def test_concurrency_is_bounded(server):
    server.hold = 0.2
    cap = load_captioner(f"openai:{server.url}#m", concurrency=2, **fast())
    out = cap.caption(pictures() * 3, [f"p{i}" for i in range(6)])
    assert out == [f"The image shows p{i}" for i in range(6)]
    assert len(server.requests) == 6
    assert 1 <= server.max_in_flight <= 2


def test_api_key_never_leaks(server, monkeypatch, caplog, tmp_path):
    monkeypatch.setenv(KEY_ENV, KEY)
    # a hostile server echoing the key in error bodies, then a good answer that is stored
    server.script = [
        Reply(500, {"error": {"message": f"upstream rejected Bearer {KEY}"}}),
        Reply(200, {"choices": [{"message": {"content": "The image shows a red square."}}]}),
        Reply(401, {"error": {"message": f"Incorrect API key provided: {KEY}"}}),
    ]
    outputs: list[str] = []
    with caplog.at_level(logging.DEBUG):
        cap = load_captioner(f"openai:{server.url}/v1#m", api_key_env=KEY_ENV, concurrency=1, **fast())
        captions = cap.caption(pictures()[:1], ["describe"])
        with pytest.raises(CaptionRequestError) as err:
            cap.caption(pictures()[:1], ["describe"])
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"  # the key was used
    assert err.value.message == f"openai:{server.url}/v1#m: HTTP 401: Incorrect API key provided: ***"
    assert err.value.hint == f"set a valid API key in the environment variable {KEY_ENV}"
    sidecar: dict = {"tags": ["x"]}
    caption = combine_caption(tags="red", caption=clean_caption(captions[0]))
    assert caption == "red. A red square."
    sdprep_meta(sidecar)["caption"] = caption_record(captions[0], cap.name, "describe", cap.settings)
    path = tmp_path / "a.png.json"
    path.write_text(json.dumps(sidecar))
    outputs += captions + [caption, str(err.value), repr(err.value), cap.name, repr(cap), caplog.text]
    outputs += [path.read_text(), json.dumps(cap.settings), str(vars(cap.options))]
    assert "upstream rejected Bearer ***" in caplog.text  # the retry was logged, redacted
    for text in outputs:
        assert KEY not in text
        assert "SECRET" not in text


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:11434", "http://127.0.0.1:11434/v1"),
        ("http://127.0.0.1:11434/", "http://127.0.0.1:11434/v1"),
        ("http://127.0.0.1:11434/v1", "http://127.0.0.1:11434/v1"),
        ("http://127.0.0.1:8000/v1/chat/completions", "http://127.0.0.1:8000/v1"),
        ("https://api.example.com/openai/v1/", "https://api.example.com/openai/v1"),
    ],
)
def test_base_url(url, expected):
    assert base_url(url) == expected


def test_spec_and_option_errors(monkeypatch):
    with pytest.raises(ConfigError, match="two model names given"):
        load_captioner("openai:http://h:1/v1#llava", model="qwen")
    with pytest.raises(ConfigError, match="is not an http"):
        load_captioner("openai:ftp://h/v1")
    with pytest.raises(ConfigError, match="must not contain credentials") as err:
        load_captioner(f"openai:http://user:{KEY}@h:1/v1")
    assert KEY not in str(err.value)
    with pytest.raises(ConfigError, match='option "device" does not apply to openai: captioners'):
        load_captioner("openai:http://h:1", device="cuda")
    with pytest.raises(ConfigError, match="concurrency must be at least 1"):
        load_captioner("openai:http://h:1", concurrency=0)
    with pytest.raises(ConfigError, match="api_key_env must be a variable name"):
        load_captioner("openai:http://h:1", api_key_env=KEY)
    assert load_captioner("openai:http://h:1/v1#llava:13b").model == "llava:13b"
    cap = load_captioner("openai:http://h:1")
    assert cap.name == "openai:http://h:1/v1" and cap.model is None
    assert cap.caption([], []) == []
    with pytest.raises(ConfigError, match="1 images but 2 prompts"):
        cap.caption(pictures()[:1], ["a", "b"])


def test_encode_image_resizes_and_flattens_alpha():
    im = Image.new("RGBA", (2000, 500), (0, 0, 0, 0))
    sent = decode_data_url(encode_image(im, max_side=400))
    assert sent.size == (400, 100)
    assert sent.getpixel((10, 10)) > (250, 250, 250)  # transparent -> white
    small = decode_data_url(encode_image(Image.new("L", (30, 20), 0), max_side=400))
    assert small.size == (30, 20) and small.mode == "RGB"
    assert decode_data_url(encode_image(im, max_side=0)).size == (2000, 500)
