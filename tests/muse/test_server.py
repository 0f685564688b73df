"""`muse serve` on the tiny pipeline over real sockets: the endpoints and their JSON, the request schema from
`SamplingOptions`, streaming previews, backpressure, limits and timeouts, disconnects, /health and /metrics, and every
defect a probe found in the old server."""

import base64
import http.client
import io
import json
import re
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


def test_the_request_schema_is_the_requests_fields_plus_the_options_it_takes():
    from muse.requests import REQUESTS, request_fields

    assert set(TASKS) == {f"/{name}" for name in REQUESTS}
    for endpoint, cls in TASKS.items():
        fields = set(request_model(endpoint).model_fields)
        options = set(option_names()) - set(cls.excluded_options)
        assert options <= fields and not set(cls.excluded_options) & fields
        assert fields - options == {f.name for f in request_fields(cls)} | {"stream", "preview_every"}
        assert {"prompt", "num_images", "seed", "negative_prompt"} <= fields
    assert {"image", "mask"} <= set(request_model("/inpaint").model_fields)
    assert {"image", "strength", "iterations", "mode"} <= set(request_model("/edit").model_fields)


@pytest.mark.parametrize("body, message", [
    ({"prompt": "x", "bogus": 1}, "bogus: unknown option"),
    ({"num_steps": 3}, "prompt: Field required"),
    ({"prompt": "x", "num_steps": 10**9}, "num_steps=1000000000 is over the limit max_steps=100"),
    ({"prompt": "x", "num_images": 100}, "over the limit max_images=64 (muse serve --max-images)"),
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
    assert status == 413 and "1000x1000 pixels" in out["error"] and "over the limit max_pixels=262144" in out["error"]
    # A decompression bomb: a valid PNG header claiming 40000 x 40000 pixels, a few hundred bytes in all.
    header = b"\x89PNG\r\n\x1a\n"
    ihdr = (40000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    chunk = lambda kind, data: len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    bomb = header + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    status, out, _ = call(server, "POST", "/edit", {"prompt": "x", "image": base64.b64encode(bomb).decode(),
                                                    "strength": 0.5})
    assert status == 413 and "pixels=1600000000" in out["error"] and "max_pixels" in out["error"]
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
        reply = raw_exchange(server, b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: " + length +
                             b"\r\nContent-Type: application/json\r\n\r\n{}")
        assert reply.startswith(b"HTTP/1.1 400"), reply[:80]
    # The unread body of a 404 must not be read as the next request.
    smuggled = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    reply = raw_exchange(server, b"POST /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: " +
                         str(len(smuggled)).encode() + b"\r\n\r\n" + smuggled)
    assert reply.startswith(b"HTTP/1.1 404") and reply.count(b"HTTP/1.1") == 1
    assert call(server, "GET", "/health")[0] == 200  # and the server still serves


def test_slow_and_idle_clients_time_out(server):
    """Headers that never end get the 408 the README promises; a body that never comes, a 408; both close."""
    start = time.monotonic()
    reply = raw_exchange(server, b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 50\r\n\r\n", wait=10)
    assert reply.startswith(b"HTTP/1.1 408") and b"connection: close" in reply.lower()
    assert time.monotonic() - start < 5  # answered and closed: raw_exchange saw the end, not its own timeout
    start = time.monotonic()
    reply = raw_exchange(server, b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\n", wait=10)  # headers never end
    assert reply.startswith(b"HTTP/1.1 408") and b"body_timeout=1.0" in reply and time.monotonic() - start < 5
    start = time.monotonic()
    assert raw_exchange(server, b"", wait=10) == b"" and time.monotonic() - start < 5  # silent: closed, no reply


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
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: "
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
            if engine["rows_in_flight"] == 0 and engine["active"] == 0:
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
    assert all("parameters" not in schema["paths"][endpoint]["post"] for endpoint in TASKS)  # the body only
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
    is a one-line error before the model loads, not a hang (uvicorn runs on a second thread there)."""
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

        start = time.monotonic()
        taken = subprocess.run([*command[:-4], "--port", str(port)], capture_output=True, text=True, timeout=120)
        assert taken.returncode != 0 and "Address already in use" in taken.stderr and "serving on" not in taken.stdout
        assert time.monotonic() - start < 60  # no model load: the address is checked first

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()


# ----------------------------------------------------------------------------------------------------------------
# Hardening (issue 22): bodies, types, formats, hosts and costs, in-process


def test_settings_compose_the_pipeline_limits_and_derive_every_flag():
    import argparse
    import dataclasses

    from muse.options import Limits
    from muse.server import add_arguments
    from muse.server.settings import settings_from_arguments

    settings = ServerSettings()
    assert isinstance(settings.limits, Limits) and settings.limits.max_images == 64
    assert settings.replace(max_steps=7, max_rows=3).limits.max_steps == 7
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(Limits)} <= flags  # every limit is a flag, under its own name
    args = parser.parse_args(["--max-prompt-chars", "10", "--max-rows", "4", "--allowed-hosts", "a.example,b"])
    derived = settings_from_arguments(args)
    assert derived.limits.max_prompt_chars == 10 and derived.max_rows == 4
    assert derived.allowed_hosts == ("a.example", "b") and derived.limits.max_images == 64


@pytest.mark.parametrize("raw, message", [
    (b'{"prompt": "apple", "seed": 1' + b"0" * 5000 + b"}", "5001 digits"),
    (b'{"prompt": "apple", "seed": [1, -' + b"9" * 5000 + b"]}", "5000 digits"),
    (b'{"prompt": "apple", "x": {"y": 1' + b"0" * 5000 + b"}}", "digits"),
    (b'{"prompt": "apple", "seed": ' + b"[" * 20 + b"1" + b"]" * 20 + b"}", "nested too deeply"),
])
def test_a_huge_integer_or_deep_nesting_anywhere_is_a_400(server, raw, message):
    status, out, _ = call(server, "POST", "/generate", raw=raw)
    assert status == 400 and message in out["error"], out


@pytest.mark.parametrize("field, value", [
    ("num_images", True), ("num_steps", "4"), ("stream", "yes"), ("guidance_scale", "1.0"), ("seed", 1.0),
    ("num_steps", 4.0), ("negative_prompt", 3),
])
def test_the_schema_is_strict_no_bool_as_int_no_string_as_number(server, field, value):
    status, out, _ = call(server, "POST", "/generate", {"prompt": "x", field: value})
    assert status == 400 and field in out["error"], out


@pytest.mark.parametrize("kind", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None])
def test_only_json_bodies_are_read_415_otherwise(server, kind):
    """A web page can post text or a form cross-origin without a preflight; JSON needs one, which we never grant."""
    headers = {"Content-Type": kind} if kind else {}
    body = b'{"prompt": "a dog"}'
    request = b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n" % len(body)
    request += b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in headers.items())
    reply = raw_exchange(server, request + b"\r\n" + body)
    assert reply.startswith(b"HTTP/1.1 415") and b"Content-Type: application/json" in reply, reply[:200]


def test_a_host_not_served_here_is_refused_and_allowed_hosts_widen_it(server, tiny_pipe):
    port = address(server)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}"):
        assert call(server, "GET", "/health", headers={"Host": host})[0] == 200, host
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", ""):
        status, out, response = call(server, "GET", "/health", headers={"Host": host})
        assert status == 400 and "--allowed-hosts" in out["error"] and response.getheader("connection") == "close"
    assert 'muse_rejections_total{reason="bad_host"}' in call(server, "GET", "/metrics")[1].decode()
    for hosts, served in ((("muse.example",), True), (("*",), True), ((), False)):
        settings = dataclasses_replace(FAST, allowed_hosts=hosts)
        with ServerThread(create_app(tiny_pipe, settings), settings) as url:
            assert (call(url, "GET", "/health", headers={"Host": "muse.example"})[0] == 200) is served


def dataclasses_replace(settings, **changes):
    return settings.replace(**changes)


def test_content_length_with_transfer_encoding_is_refused_and_closed(server):
    start = time.monotonic()
    reply = raw_exchange(server, b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", wait=10)
    assert reply.startswith(b"HTTP/1.1 400") and b"RFC 9112" in reply and reply.count(b"HTTP/1.1") == 1
    assert b"connection: close" in reply.lower() and time.monotonic() - start < 5


def test_only_png_jpeg_and_webp_are_decoded(server, picture):
    """Pillow is never offered another format: an EPS would run Ghostscript on the server."""
    eps = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
           b"newpath 0 0 moveto 16 0 lineto 16 16 lineto closepath fill\nshowpage\n%%EOF\n")
    gif = io.BytesIO()
    picture.save(gif, format="GIF")
    for raw in (eps, gif.getvalue()):
        status, out, _ = call(server, "POST", "/edit", {"prompt": "x", "image": base64.b64encode(raw).decode(),
                                                        "strength": 0.5})
        assert status == 400 and "format; musegen decodes PNG, JPEG and WebP only" in out["error"], out
    for kind in ("JPEG", "WEBP"):
        data = io.BytesIO()
        picture.save(data, format=kind)
        status, out, _ = call(server, "POST", "/edit", {"prompt": "x", "image": base64.b64encode(data.getvalue())
                                                        .decode(), "strength": 0.5, "seed": 0})
        assert status == 200, (kind, out)


def test_a_prompt_over_max_prompt_chars_is_refused_before_any_work(server):
    from muse.server.settings import SERVER_LIMITS

    limit = SERVER_LIMITS.max_prompt_chars
    for body, what in (({"prompt": "a" * (limit + 1)}, "prompt"),
                       ({"prompt": ["a dog", "b" * (limit + 1)]}, "prompt[1]"),
                       ({"prompt": "a dog", "negative_prompt": "c" * (limit + 1)}, "negative_prompt")):
        status, out, _ = call(server, "POST", "/generate", body)
        assert status == 413 and f"{what}'s characters={limit + 1} is over the limit max_prompt_chars" in out["error"]
    assert call(server, "POST", "/generate", {"prompt": "a" * limit, "num_steps": 1})[0] == 200


def test_an_outpaint_costing_minutes_is_refused_by_its_estimate_in_milliseconds():
    """Issue 22: a 64 px image outpainted by 192 px per side (448 x 448, within every other default limit) is 168
    windows of 24 steps on the bundled model and took the engine for 100-120 s, slowing every other client 20x. The
    server refuses it from its estimated cost, before any work, naming its flag; a cheaper outpaint is accepted."""
    from muse.pipeline import MusePipeline
    from muse.server.settings import SERVER_LIMITS

    pipe = MusePipeline.from_pretrained()  # the bundled model: the case's cost is its grid's and steps'
    image = png(Image.new("RGB", (64, 64), "white"))
    with ServerThread(create_app(pipe, FAST), FAST) as url:
        start = time.perf_counter()
        status, out, _ = call(url, "POST", "/outpaint", {"prompt": "sky", "image": image, "pad": [192] * 4})
        elapsed = time.perf_counter() - start
        assert status == 400 and out["error"] == (
            "the request's decoding cost in row-steps (estimated)=24192 is over the limit "
            f"max_row_steps={SERVER_LIMITS.max_row_steps} (muse serve --max-row-steps)"), out
        assert elapsed < 1.0
        status, out, _ = call(url, "POST", "/outpaint", {"prompt": "sky", "image": image, "pad": [0, 0, 8, 0],
                                                         "num_steps": 2, "seed": 0})
        assert status == 200 and pixels(out["images"][0]).shape == (64, 72, 3), out


def test_limits_check_prompts_is_the_one_check_for_every_entry_point():
    from muse.options import Limits

    limits = Limits(max_prompt_chars=5)
    limits.check_prompts("prompt", "abcde")
    limits.check_prompts("prompt", None)
    limits.check_prompts("prompt", [1, None])  # not strings: left to the prompt's own checks
    with pytest.raises(ValueError, match=r"prompt\[1\]'s characters=6 is over the limit max_prompt_chars=5"):
        limits.check_prompts("prompt", ["a", "abcdef"])


def test_a_refusal_sent_before_the_body_closes_the_connection(tiny_pipe):
    """A 413 (and a 408, above) is not followed by waiting for the rest of a body that may never come."""
    settings = FAST.replace(max_body_bytes=1000)
    with ServerThread(create_app(tiny_pipe, settings), settings) as url:
        start = time.monotonic()
        reply = raw_exchange(url, b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                                  b"Content-Length: 1000000\r\n\r\n{", wait=10)
        assert reply.startswith(b"HTTP/1.1 413") and b"connection: close" in reply.lower()
        assert time.monotonic() - start < 3


def test_a_held_body_after_a_reply_is_closed_within_body_timeout_and_counted(server):
    """GET /health declaring a body, one byte of it, then silence: answered, then closed at body_timeout."""
    sock = socket.create_connection(address(server), timeout=15)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000\r\n\r\n")
    reply = b""
    while not reply.endswith(b"}}"):  # the whole /health reply
        reply += sock.recv(65536)
    start = time.monotonic()
    sock.sendall(b"x")  # after the reply: this stops uvicorn's keep-alive timer, which alone would close it
    assert sock.recv(65536) == b"" and time.monotonic() - start < FAST.body_timeout + 2  # closed by the server
    sock.close()
    assert reply.startswith(b"HTTP/1.1 200")
    metrics = call(server, "GET", "/metrics")[1].decode()
    assert 'muse_connections_closed_total{reason="body_timeout"}' in metrics
    assert "muse_open_connections" in metrics


def test_accept_running_out_of_file_descriptors_logs_one_line_not_a_traceback_per_attempt(caplog):
    import asyncio
    import errno
    import logging

    from muse.server.connections import ConnectionStats, quiet_accept_errors

    loop = asyncio.new_event_loop()
    try:
        quiet_accept_errors(loop, ConnectionStats(10))
        with caplog.at_level(logging.WARNING):
            for _ in range(2048):  # what asyncio's accept loop reports in one tick under EMFILE
                loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                             "exception": OSError(errno.EMFILE, "Too many open files")})
    finally:
        loop.close()
    records = [r for r in caplog.records if "accept" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info is None and "Too many open files" in records[0].getMessage()


def test_muse_serve_checks_the_port_and_host_before_loading_the_model(tmp_path):
    """A missing model would fail at load: the address error comes first, so it is checked first."""
    from muse import cli

    missing = str(tmp_path / "no-model")
    with pytest.raises(SystemExit, match="cannot listen on 999.1.1.1:8000: '999.1.1.1' is not a valid host"):
        cli.main(["serve", "--model", missing, "--host", "999.1.1.1"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            cli.main(["serve", "--model", missing, "--port", str(port)])


def test_docs_is_our_own_page_with_nothing_fetched_from_elsewhere(server):
    status, page, response = call(server, "GET", "/docs")
    assert status == 200 and b"/static/docs.js" in page
    for path in ("/docs", "/static/docs.js", "/static/docs.css"):
        text = call(server, "GET", path)[1].decode()
        assert not re.search(r"https?://", text), path
    assert call(server, "GET", "/redoc")[0] == 404  # FastAPI's ReDoc loads from a CDN too


# ----------------------------------------------------------------------------------------------------------------
# The connection layer of the real `muse serve` process (issue 22): held connections, slow headers, ambiguous framing


OPEN_FILES = 300  # the probe's server: 293 held connections made /health time out and the log fill at 5 MB/s
BODY_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def served(tiny_pipeline_dir, tmp_path_factory):
    """`muse serve` in its own process with OPEN_FILES file descriptors (so its connection cap, derived from them,
    is what stands between held connections and /health), its log in a file: (url, log path)."""
    import resource
    import subprocess
    import sys

    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    port = free_port()
    command = [sys.executable, "-m", "muse.cli", "serve", "--model", str(tiny_pipeline_dir), "--port", str(port),
               "--preview-every", "2", "--body-timeout", str(BODY_TIMEOUT), "--keep-alive", "1"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, preexec_fn=lambda:
                                   resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES)))
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    try:
        while True:
            try:
                call(url, "GET", "/health", timeout=5)
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
        yield url, log_path
    finally:
        process.kill()
        process.wait(timeout=30)


def closed_by_server(sock: socket.socket, within: float) -> bytes:
    """Everything the server sends until it closes `sock`; fails if it is still open after `within` seconds."""
    sock.settimeout(within)
    received, start = b"", time.monotonic()
    try:
        while part := sock.recv(65536):
            received += part
    except socket.timeout:
        pytest.fail(f"the server still held the connection after {within} s (received {received[:80]!r})")
    finally:
        sock.close()
    assert time.monotonic() - start <= within
    return received


def metric(url: str, name: str) -> float:
    text = call(url, "GET", "/metrics")[1].decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_the_real_server_closes_a_held_body_within_body_timeout_and_counts_it(served):
    url, _ = served
    before = metric(url, 'muse_connections_closed_total{reason="body_timeout"}')
    within = BODY_TIMEOUT + 2  # the deadline, its grace for the app's own 408, and slack for a loaded machine
    # GET /health declaring a megabyte, one byte of it after the reply, then silence (uvicorn alone: never closed).
    sock = socket.create_connection(address(url))
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000\r\n\r\n")
    time.sleep(0.3)
    sock.sendall(b"x")
    assert closed_by_server(sock, within).startswith(b"HTTP/1.1 200")
    # A POST whose body stalls part-way: 408, then closed (not kept alive for a next request).
    sock = socket.create_connection(address(url))
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"prompt\"")
    reply = closed_by_server(sock, within)
    assert reply.startswith(b"HTTP/1.1 408") and b"body_timeout=2.0" in reply
    # Over max_body_bytes: 413 at once, and closed at once.
    sock = socket.create_connection(address(url))
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 999999999\r\n\r\n{")
    assert closed_by_server(sock, 2.0).startswith(b"HTTP/1.1 413")
    assert metric(url, 'muse_connections_closed_total{reason="body_timeout"}') >= before + 1


def test_the_real_server_answers_slow_headers_with_408_and_refuses_ambiguous_framing(served):
    url, _ = served
    import select

    sock = socket.create_connection(address(url))
    start = time.monotonic()
    for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slowloris\r\n":
        if select.select([sock], [], [], 0.25)[0]:  # a byte every 0.25 s, until the server answers
            break
        sock.sendall(bytes([byte]))
    reply = closed_by_server(sock, BODY_TIMEOUT + 1)
    assert reply.startswith(b"HTTP/1.1 408") and b"connection: close" in reply.lower()
    assert time.monotonic() - start < BODY_TIMEOUT + 1  # one deadline for all the headers, not one per byte
    assert metric(url, 'muse_connections_closed_total{reason="header_timeout"}') >= 1
    sock = socket.create_connection(address(url))
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 20\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /health HTTP/1.1\r\n\r\n")
    reply = closed_by_server(sock, 2.0)
    assert reply.startswith(b"HTTP/1.1 400") and reply.count(b"HTTP/1.1") == 1 and b"Transfer-Encoding" in reply


def test_300_held_connections_neither_starve_health_nor_flood_the_log(served):
    url, log_path = served
    log_before = log_path.stat().st_size
    held = []
    try:
        for i in range(300):  # half stall in their headers, half in their bodies
            sock = socket.create_connection(address(url))
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 12" if i % 2 else
                         b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{")
            held.append(sock)
        for _ in range(5):  # while they are held (well within BODY_TIMEOUT of the last one)
            start = time.monotonic()
            assert call(url, "GET", "/health", timeout=5)[0] == 200
            assert time.monotonic() - start < 2
        assert metric(url, 'muse_connections_closed_total{reason="evicted"}') >= 1  # the cap did the work
        assert metric(url, "muse_open_connections") <= OPEN_FILES
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.5)
    logged = log_path.read_bytes()[log_before:].decode(errors="replace")
    assert "Traceback" not in logged and len(logged.splitlines()) < 50, logged[-2000:]


def test_the_default_limits_accept_an_ordinary_request_at_a_best_of_8_models_defaults(tiny_pipe):
    # The bundled model generates 8 candidates per image by default; three images of it were once refused by the
    # server's own defaults, with a message naming a config field instead of the flag.
    import copy

    pipe = copy.copy(tiny_pipe)
    pipe.config = pipe.config.with_sampling(num_candidates=8)
    settings = ServerSettings(body_timeout=1.0, keep_alive=1)
    with ServerThread(create_app(pipe, settings), settings) as url:
        status, out, _ = call(url, "POST", "/generate", {"prompt": "red apple", "seed": 0, "num_images": 3,
                                                         "num_steps": 2})
        assert status == 200 and len(out["images"]) == 3, out
        status, out, _ = call(url, "POST", "/generate", {"prompt": "red apple", "num_images": 9})
        assert status == 400 and "(muse serve --max-images)" in out["error"] and "PipelineConfig" not in out["error"]
