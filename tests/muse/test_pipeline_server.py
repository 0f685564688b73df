"""`muse serve` end to end with the real tiny pipeline: the server's option names reach MusePipeline unchanged, its
errors come back as 400s, and a served image is the one the Python API makes."""

import base64
import http.client
import io
import json
import threading

import numpy as np
import pytest
from PIL import Image

from muse.server import encode_png, make_server


@pytest.fixture
def served(tiny_pipe):
    server = make_server(tiny_pipe, port=0, model_name="tiny")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def post(server, path, body):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    payload = json.loads(response.read())
    conn.close()
    return response.status, payload


def decode_png(data):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


def test_every_endpoint_runs_the_pipeline(served, tiny_pipe):
    status, out = post(served, "/generate", {"prompt": "a red apple", "num_images": 2, "seed": 3, "num_steps": 3})
    assert status == 200 and out["seeds"] == [3, 4]
    expected = tiny_pipe("a red apple", num_images=2, seed=3, num_steps=3)
    assert np.array_equal(decode_png(out["images"][1]), np.asarray(expected.images[1]))

    image = encode_png(expected.images[0])
    mask = encode_png(Image.fromarray(np.pad(np.full((4, 4), 255, np.uint8), ((0, 12), (0, 12)))))
    status, out = post(served, "/inpaint", {"prompt": "a dog", "image": image, "mask": mask, "seed": 0, "num_steps": 2})
    assert status == 200 and decode_png(out["images"][0]).shape == (16, 16, 3)
    status, out = post(served, "/outpaint", {"prompt": "sky", "image": image, "pad": [0, 4, 8, 0], "num_steps": 2})
    assert status == 200 and decode_png(out["images"][0]).shape == (20, 24, 3)
    status, out = post(served, "/edit", {"prompt": "a cat", "image": image, "strength": 0.0})
    assert status == 200 and np.array_equal(decode_png(out["images"][0]), np.asarray(expected.images[0]))


def test_upscale_and_best_of_n_are_served(served, tiny_cascade):
    status, out = post(served, "/generate", {"prompt": "a dog", "seed": 2, "num_steps": 2, "num_candidates": 3})
    assert status == 200 and len(out["scores"]) == 1
    image = encode_png(Image.new("RGB", (16, 16), "red"))
    status, out = post(served, "/upscale", {"prompt": "a dog", "image": image})
    assert status == 400 and "no super-resolution stage" in out["error"]
    cascade = make_server(tiny_cascade, port=0)
    thread = threading.Thread(target=cascade.serve_forever, daemon=True)
    thread.start()
    try:
        status, out = post(cascade, "/upscale", {"prompt": "a dog", "image": image, "seed": 1, "superres_steps": 2})
        assert status == 200 and decode_png(out["images"][0]).shape == (32, 32, 3)
        expected = tiny_cascade.upscale("a dog", image=Image.new("RGB", (16, 16), "red"), seed=1, superres_steps=2)
        assert np.array_equal(decode_png(out["images"][0]), np.asarray(expected.images[0]))
        status, out = post(cascade, "/upscale", {"prompt": "a dog", "image": image, "num_steps": 3})
        assert status == 400 and "unknown option(s) for /upscale: num_steps" in out["error"]
    finally:
        cascade.shutdown()
        cascade.server_close()


def test_pipeline_errors_become_400s(served):
    image = encode_png(Image.new("RGB", (16, 16)))
    status, out = post(served, "/outpaint", {"prompt": "sky", "image": image, "pad": [0, 3, 0, 0]})
    assert status == 400 and "multiples of 4 pixels" in out["error"]
    status, out = post(served, "/generate", {"prompt": "x", "num_images": 0})
    assert status == 400 and "num_images must be >= 1" in out["error"]


def test_every_server_option_is_a_keyword_of_its_pipeline_method():
    import inspect

    from muse.pipeline import MusePipeline
    from muse.server import ENDPOINTS

    from muse.options import option_names

    for endpoint, (method, allowed, _) in ENDPOINTS.items():
        keywords = set(inspect.signature(getattr(MusePipeline, method)).parameters) - {"self"}
        allowed = allowed - set(option_names())  # sampling options go through **overrides
        assert allowed <= keywords, f"{endpoint}: {sorted(allowed - keywords)} are not {method} keywords"


def test_sampling_options_reach_the_pipeline(served, tiny_pipe):
    body = {"prompt": "a red apple", "seed": 1, "num_steps": 3, "top_k": 5, "guidance_schedule": "linear",
            "guidance_scale": 2.0}
    status, out = post(served, "/generate", body)
    assert status == 200
    expected = tiny_pipe("a red apple", seed=1, num_steps=3, top_k=5, guidance_schedule="linear", guidance_scale=2.0)
    assert np.array_equal(decode_png(out["images"][0]), np.asarray(expected.images[0]))
