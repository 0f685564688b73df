"""`muse serve` on the tiny pipeline over real sockets: the endpoints and their JSON, the request schema from
`SamplingOptions`, streaming previews, backpressure, limits and timeouts, disconnects, /health and /metrics, and every
defect a probe found in the old server."""

import base64
import http.client
import io
import json
import socket
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from muse.options import option_names
from muse.server import TASKS, ServerSettings, ServerThread, create_app, encode_png, request_model

FAST = ServerSettings(preview_every=2, body_timeout=1.0, keep_alive=1, request_timeout=30.0)


@pytest.fixture(scope="module")
def server(tiny_pipe):
    with ServerThread(create_app(tiny_pipe, FAST, model_name="tiny"), FAST) as url:
        yield url


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def call(url, method, path, body=None, raw=None, headers=None, timeout=60):
    conn = http.client.HTTPConnection(*address(url), timeout=timeout)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    kind = response.getheader("content-type", "")
    return response.status, json.loads(payload) if "json" in kind else payload, response


def png(image: Image.Image) -> str:
    return encode_png(image)


def pixels(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))))


@pytest.fixture(scope="module")
def picture(tiny_pipe):
    return tiny_pipe("a red apple", seed=3).images[0]


def test_every_endpoint_gives_the_python_apis_images(server, tiny_pipe, tiny_cascade, picture):
    mask = Image.fromarray(np.pad(np.full((8, 8), 255, np.uint8), 4))
    cases = [
        ("/generate", {"prompt": "a dog", "seed": 4, "num_steps": 3, "top_k": 5},
         lambda: tiny_pipe("a dog", seed=4, num_steps=3, top_k=5)),
        ("/inpaint", {"prompt": "a cat", "seed": 1, "image": png(picture), "mask": png(mask)},
         lambda: tiny_pipe.inpaint("a cat", seed=1, image=picture, mask=mask)),
        ("/outpaint", {"prompt": "sky", "seed": 2, "image": png(picture), "pad": [4, 0, 4, 0]},
         lambda: tiny_pipe.outpaint("sky", seed=2, image=picture, pad=(4, 0, 4, 0))),
        ("/edit", {"prompt": "a tree", "seed": 5, "image": png(picture), "strength": 0.5, "mode": "confidence"},
         lambda: tiny_pipe.edit("a tree", seed=5, image=picture, strength=0.5, mode="confidence")),
    ]
    for path, body, expected in cases:
        status, out, _ = call(server, "POST", path, body)
        assert status == 200, (path, out)
        want = expected()
        assert out["seeds"] == want.seeds
        assert np.array_equal(pixels(out["images"][0]), np.asarray(want.images[0])), path
    status, out, _ = call(server, "POST", "/generate", {"prompt": "a cat", "seed": 2, "num_candidates": 2})
    assert status == 200 and len(out["scores"]) == 1 and len(out["candidate_seeds"]) == 1
    with ServerThread(create_app(tiny_cascade, FAST)) as cascade:
        status, out, _ = call(cascade, "POST", "/upscale", {"prompt": "a dog", "image": png(picture), "seed": 0})
        assert status == 200 and pixels(out["images"][0]).shape == (32, 32, 3)
        status, out, _ = call(cascade, "POST", "/upscale", {"prompt": "a dog", "image": png(picture), "num_steps": 3})
        assert status == 400 and "num_steps: unknown option" in out["error"]


def test_the_request_schema_is_the_options_plus_the_tasks_arguments():
    for endpoint, (builder, own, excluded) in TASKS.items():
        fields = set(request_model(endpoint).model_fields)
        options = set(option_names()) - set(excluded)
        assert options <= fields and not set(excluded) & fields
        assert fields - options == {"prompt", "num_images", "seed", "negative_prompt", "stream", "preview_every",
                                    *own}


@pytest.mark.parametrize("body, message", [
    ({"prompt": "x", "bogus": 1}, "bogus: unknown option"),
    ({"num_steps": 3}, "prompt: Field required"),
    ({"prompt": "x", "num_steps": 10**9}, "num_steps=1000000000 is over the limit max_steps=100"),
    ({"prompt": "x", "num_images": 100}, "over the limit max_images=16"),
    ({"prompt": "x", "num_candidates": 9}, "num_candidates=9 is over the limit max_candidates=8"),
    ({"prompt": "x", "temperature": 1e-300}, "temperature must be a positive finite number"),
    ({"prompt": "x", "guidance_schedule": "zigzag"}, "guidance_schedule"),
    ({"prompt": "x", "num_images": 0}, "num_images must be >= 1"),
])
def test_bad_requests_are_400s_naming_the_problem(server, body, message):
    status, out, _ = call(server, "POST", "/generate", body)
    assert status == 400 and message in out["error"], out


def test_bad_bodies_are_400s_never_500s(server):
    assert call(server, "POST", "/generate", raw=b"\xff\xfe{")[0] == 400  # not UTF-8
    status, out, _ = call(server, "POST", "/generate", raw=b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and "nested too deeply" in out["error"]
    assert call(server, "POST", "/generate", raw=b"[1, 2]")[0] == 400
    assert call(server, "POST", "/generate", raw=b"{not json")[0] == 400


def test_images_over_the_pixel_limit_are_refused_from_their_header(server, picture):
    big = Image.new("RGB", (1000, 1000))
    status, out, _ = call(server, "POST", "/edit", {"prompt": "x", "image": png(big), "strength": 0.5})
    assert status == 413 and "1000x1000 pixels, over the limit max_pixels=262144" in out["error"]
    # A decompression bomb: a valid PNG header claiming 40000 x 40000 pixels, a few hundred bytes in all.
    header = b"\x89PNG\r\n\x1a\n"
    ihdr = (40000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    chunk = lambda kind, data: len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    bomb = header + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    status, out, _ = call(server, "POST", "/edit", {"prompt": "x", "image": base64.b64encode(bomb).decode(),
                                                    "strength": 0.5})
    assert status == 413 and "1600000000 pixels" in out["error"] and "max_pixels" in out["error"]
    status, out, _ = call(server, "POST", "/outpaint", {"prompt": "x", "image": png(picture), "pad": [0, 0, 400, 0]})
    assert status == 400 and "over the limit max_pad=256" in out["error"]
    status, out, _ = call(server, "POST", "/inpaint", {"prompt": "x", "image": "%%%", "mask": png(picture)})
    assert status == 400 and "'image' is not valid base64" in out["error"]


def test_a_body_over_the_limit_is_a_413_without_reading_it(tiny_pipe):
    settings = ServerSettings(max_body_bytes=1000, preview_every=2)
    with ServerThread(create_app(tiny_pipe, settings), settings) as url:
        status, out, _ = call(url, "POST", "/generate", raw=b"{" + b" " * 5000 + b"}")
        assert status == 413 and "max_body_bytes=1000" in out["error"]


def raw_exchange(url: str, data: bytes, wait: float = 3.0) -> bytes:
    sock = socket.create_connection(address(url), timeout=wait)
    sock.sendall(data)
    received = b""
    try:
        while True:
            part = sock.recv(65536)
            if not part:
                break
            received += part
    except socket.timeout:
        pass
    sock.close()
    return received


def test_http_framing_cannot_be_confused(server):
    for length in (b"-1", b"abc"):
        reply = raw_exchange(server, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: " + length +
                             b"\r\nContent-Type: application/json\r\n\r\n{}")
        assert reply.startswith(b"HTTP/1.1 400"), reply[:80]
    # The unread body of a 404 must not be read as the next request.
    smuggled = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    reply = raw_exchange(server, b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: " +
                         str(len(smuggled)).encode() + b"\r\n\r\n" + smuggled)
    assert reply.startswith(b"HTTP/1.1 404") and reply.count(b"HTTP/1.1") == 1
    assert call(server, "GET", "/health")[0] == 200  # and the server still serves


def test_slow_and_idle_clients_time_out(server):
    start = time.monotonic()
    reply = raw_exchange(server, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n", wait=10)
    assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 5  # headers, but never the body
    start = time.monotonic()
    assert raw_exchange(server, b"POST /generate HTTP/1.1\r\nHost: x\r\n", wait=10) == b""  # headers never end
    assert time.monotonic() - start < 5


def read_events(response) -> list[tuple[str, dict]]:
    events, kind = [], None
    for line in response.read().decode().splitlines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[6:])))
    return events


def test_a_stream_reports_the_queue_the_steps_with_previews_and_the_result(server, tiny_pipe):
    conn = http.client.HTTPConnection(*address(server), timeout=60)
    conn.request("POST", "/generate", body=json.dumps({"prompt": "a dog", "seed": 4, "num_steps": 4, "stream": True}),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    events = read_events(response)
    conn.close()
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "queued" and kinds[-1] == "done" and kinds.count("step") == 4
    steps = [data for kind, data in events if kind == "step"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and steps[-1]["masked"] == 0
    assert [("preview" in s) for s in steps] == [False, True, False, True]  # every 2nd step, and the last
    final = pixels(events[-1][1]["images"][0])
    assert np.array_equal(final, np.asarray(tiny_pipe("a dog", seed=4, num_steps=4).images[0]))
    assert np.array_equal(pixels(steps[-1]["preview"]), final)  # the last preview is the image


def test_a_full_queue_gets_429_with_retry_after(tiny_pipe, slow_model):
    settings = ServerSettings(max_rows=2, max_queued=1, preview_every=2)
    app = create_app(tiny_pipe, settings)
    with ServerThread(app, settings) as url:
        results = []

        def post():
            results.append(call(url, "POST", "/generate", {"prompt": "a dog", "num_steps": 30, "seed": 1}))

        threads = [threading.Thread(target=post) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = sorted(status for status, _, _ in results)
        assert 429 in statuses and 200 in statuses and not any(s >= 500 for s in statuses)
        busy = next(r for s, _, r in results if s == 429)
        assert busy.getheader("retry-after") == "1"
        metrics = call(url, "GET", "/metrics")[1].decode()
        assert 'muse_rejections_total{reason="queue_full"}' in metrics


@pytest.fixture
def slow_model(tiny_pipe, monkeypatch):
    """The tiny transformer at 50 ms a forward, so that a request is still running when its client acts."""
    real = tiny_pipe.transformer.forward

    def slow(*args, **kwargs):
        time.sleep(0.05)
        return real(*args, **kwargs)

    monkeypatch.setattr(tiny_pipe.transformer, "forward", slow)


def test_a_client_that_hangs_up_has_its_job_cancelled(tiny_pipe, slow_model):
    settings = ServerSettings(preview_every=2)
    app = create_app(tiny_pipe, settings)
    with ServerThread(app, settings) as url:
        for _ in range(3):
            sock = socket.create_connection(address(url))
            body = json.dumps({"prompt": "a dog", "num_steps": 100, "num_images": 8}).encode()
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            time.sleep(0.3)
            sock.close()
        deadline = time.monotonic() + 20
        text = ""
        while time.monotonic() < deadline:
            text = call(url, "GET", "/metrics")[1].decode()
            if 'muse_rejections_total{reason="disconnected"} 3.0' in text:
                break
            time.sleep(0.2)
        assert 'muse_rejections_total{reason="disconnected"} 3.0' in text
        for _ in range(50):  # the cancellations take effect at the engine's next tick
            engine = call(url, "GET", "/health")[1]["engine"]
            if engine["rows_in_flight"] == 0:
                break
            time.sleep(0.1)
        assert engine["rows_in_flight"] == 0 and engine["active"] == 0


def test_a_request_past_its_deadline_is_cancelled_with_504(tiny_pipe, slow_model):
    settings = ServerSettings(request_timeout=0.3, preview_every=2)
    with ServerThread(create_app(tiny_pipe, settings), settings) as url:
        status, out, _ = call(url, "POST", "/generate", {"prompt": "a dog", "num_steps": 100, "num_images": 16})
        assert status == 504 and "request_timeout=0.3" in out["error"]


def test_health_metrics_and_openapi(server, tiny_pipeline_dir):
    status, health, _ = call(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == "tiny"
    assert str(tiny_pipeline_dir) not in json.dumps(health) and "/" not in health["model"]
    status, text, response = call(server, "GET", "/metrics")
    text = text.decode()
    for name in ("muse_queue_depth", "muse_jobs_in_flight", "muse_rows_in_flight", "muse_rows_per_forward",
                 "muse_request_seconds_bucket", "muse_requests_total"):
        assert name in text
    status, schema, _ = call(server, "GET", "/openapi.json")
    assert status == 200 and "/inpaint" in schema["paths"]
    body = schema["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "guidance_scale" in json.dumps(body)
    assert call(server, "GET", "/docs")[0] == 200


def test_a_corrupt_scorer_stops_the_server_at_start_up(tiny_pipeline_dir, tmp_path):
    import shutil

    from muse import cli

    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model)
    config = json.loads((model / "pipeline.json").read_text())
    config["config"]["sampling"]["num_candidates"] = 2
    (model / "pipeline.json").write_text(json.dumps(config))
    (model / "scorer").mkdir()
    (model / "scorer" / "config.json").write_text("{broken")
    with pytest.raises(SystemExit, match="scorer"):
        cli.main(["serve", "--model", str(model), "--port", "0"])
    with pytest.raises(SystemExit, match="--port must be in 0..65535"):
        cli.main(["serve", "--port", "99999"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_muse_serve_drives_the_engine_on_its_main_thread_and_stops_cleanly_on_sigterm(tiny_pipeline_dir):
    """The real command in its own process: it answers, shuts down gracefully on SIGTERM (exit 0), and a port in use
    is a one-line error, not a hang (uvicorn runs on a second thread there)."""
    import signal
    import subprocess
    import sys

    port = free_port()
    command = [sys.executable, "-m", "muse.cli", "serve", "--model", str(tiny_pipeline_dir), "--port", str(port),
               "--preview-every", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            try:
                status, health, _ = call(url, "GET", "/health", timeout=5)
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
                time.sleep(0.2)
        assert status == 200 and health["status"] == "ok"
        status, reply, _ = call(url, "POST", "/generate", {"prompt": "a red apple", "seed": 1, "num_steps": 2})
        assert status == 200 and reply["seeds"] == [1] and pixels(reply["images"][0]).ndim == 3

        taken = subprocess.run([*command[:-4], "--port", str(port)], capture_output=True, text=True, timeout=120)
        assert taken.returncode != 0 and "did not start" in taken.stderr

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
