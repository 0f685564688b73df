"""The HTTP layer: framing, option checking and error replies. A stand-in pipeline records calls so these tests need
no model; the end-to-end test with a real tiny pipeline lives beside the pipeline tests."""

import base64
import http.client
import io
import json
import threading
from dataclasses import dataclass

import pytest
from PIL import Image

from muse.server import encode_png, make_server


@dataclass
class FakeOutput:
    images: list
    seeds: list


class FakePipeline:
    def __init__(self):
        self.calls = []

    def __call__(self, prompt, *, num_images=1, seed=None, **options):
        if not prompt:
            raise ValueError("prompt must be a non-empty string")
        self.calls.append(("generate", prompt, dict(options, num_images=num_images, seed=seed)))
        return FakeOutput([Image.new("RGB", (8, 8), "red")] * num_images, [(seed or 0) + i for i in range(num_images)])

    def inpaint(self, prompt, *, image, mask, **options):
        self.calls.append(("inpaint", prompt, {"image": image.size, "mask": mask.size, **options}))
        return FakeOutput([image.convert("RGB")], [0])

    def outpaint(self, prompt, *, image, pad, **options):
        self.calls.append(("outpaint", prompt, {"pad": pad, **options}))
        return FakeOutput([image.convert("RGB")], [0])


@pytest.fixture
def server():
    pipe = FakePipeline()
    srv = make_server(pipe, port=0, model_name="fake")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, pipe
    srv.shutdown()
    srv.server_close()


def request(srv, method, path, body=None, raw=None):
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=10)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = json.loads(resp.read())
    conn.close()
    return resp.status, payload


def png(color, size=(8, 8), mode="RGB"):
    return encode_png(Image.new(mode, size, color))


def test_health(server):
    srv, _ = server
    assert request(srv, "GET", "/health") == (200, {"status": "ok", "model": "fake"})


def test_generate_returns_pngs_and_seeds(server):
    srv, pipe = server
    status, out = request(srv, "POST", "/generate", {"prompt": "red apple", "num_images": 2, "seed": 5, "num_steps": 3})
    assert status == 200 and out["seeds"] == [5, 6]
    image = Image.open(io.BytesIO(base64.b64decode(out["images"][1])))
    assert image.size == (8, 8) and image.getpixel((0, 0)) == (255, 0, 0)
    assert pipe.calls == [("generate", "red apple", {"num_steps": 3, "num_images": 2, "seed": 5})]


def test_images_and_pad_reach_the_pipeline(server):
    srv, pipe = server
    assert request(srv, "POST", "/inpaint", {"prompt": "x", "image": png("blue"), "mask": png(255, mode="L")})[0] == 200
    assert request(srv, "POST", "/outpaint", {"prompt": "x", "image": png("blue"), "pad": [0, 8, 0, 0]})[0] == 200
    assert pipe.calls[0][2] == {"image": (8, 8), "mask": (8, 8)}
    assert pipe.calls[1][2] == {"pad": (0, 8, 0, 0)}


@pytest.mark.parametrize(
    "path, body, message",
    [
        ("/generate", {"prompt": "x", "num_imagez": 2}, "unknown option(s) for /generate: num_imagez"),
        ("/generate", {"num_images": 2}, "missing 'prompt'"),
        ("/generate", {"prompt": ""}, "prompt must be a non-empty string"),
        ("/inpaint", {"prompt": "x", "image": "not base64!", "mask": png(0, mode="L")}, "'image' is not valid base64"),
        ("/inpaint", {"prompt": "x", "image": base64.b64encode(b"GIF? no").decode(), "mask": png(0)}, "not a readable image"),
        ("/generate", [1, 2], "must be a JSON object"),
    ],
)
def test_bad_requests_get_400_naming_the_problem(server, path, body, message):
    srv, pipe = server
    status, out = request(srv, "POST", path, body)
    assert status == 400 and message in out["error"]
    assert pipe.calls == []


def test_not_json_and_unknown_endpoint(server):
    srv, _ = server
    status, out = request(srv, "POST", "/generate", raw=b"{oops")
    assert status == 400 and "not valid JSON" in out["error"]
    assert request(srv, "POST", "/nope", {})[0] == 404
    assert request(srv, "GET", "/generate")[0] == 404
