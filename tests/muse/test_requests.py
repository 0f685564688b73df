"""Requests as values: each task's inputs in one frozen dataclass, checked when made, carrying its SamplingOptions
whole; the keyword call, the request and the command line are one code path, and the command line's flags and a
server's schema derive from the request's fields."""

import dataclasses

import numpy as np
import pytest
import torch

from muse import cli
from muse.options import SamplingOptions, option_names
from muse.requests import (
    REQUESTS,
    EditRequest,
    GenerateRequest,
    InpaintRequest,
    OutpaintRequest,
    Request,
    UpscaleRequest,
    request_fields,
)

IMAGE = np.zeros((16, 16, 3), np.uint8)
OPTIONS = SamplingOptions(num_steps=2, guidance_scale=3.0)


@pytest.mark.parametrize("make, error, message", [
    (lambda: GenerateRequest("", options=OPTIONS), ValueError, "prompt is empty"),
    (lambda: GenerateRequest("a", options=OPTIONS, num_images=0), ValueError, "num_images must be >= 1"),
    (lambda: GenerateRequest("a", options=OPTIONS, seed="x"), TypeError, "seed must be an integer"),
    (lambda: GenerateRequest("a", options=SamplingOptions(guidance_scale=1.0), negative_prompt="b"), ValueError,
     "use a guidance_scale above 1"),
    (lambda: GenerateRequest("a", options={"num_steps": 2}), TypeError, "options must be a SamplingOptions"),
    (lambda: GenerateRequest("a", options=OPTIONS, scorer="best"), TypeError, "scorer must be a callable"),
    (lambda: InpaintRequest("a", options=OPTIONS, image=IMAGE, mask=7), TypeError, "mask must be a PIL image"),
    (lambda: OutpaintRequest("a", options=OPTIONS, image=IMAGE, pad=(0, -4, 0, 0)), ValueError, "not be negative"),
    (lambda: EditRequest("a", options=OPTIONS, image=IMAGE, strength=1.5), ValueError, "strength must be a number"),
    (lambda: EditRequest("a", options=OPTIONS, image=IMAGE, strength=0.5, mode="best"), ValueError, "mode must be"),
    (lambda: UpscaleRequest("a", options=OPTIONS, image=[[IMAGE]]), TypeError, r"image\[0\] must be"),
    (lambda: Request("a", options=OPTIONS), TypeError, "make a GenerateRequest"),
])
def test_a_request_is_checked_when_made(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_a_request_is_a_frozen_value():
    request = InpaintRequest(["a", "b"], options=OPTIONS, image=IMAGE, mask=IMAGE[..., 0] > 0, seed=[1, 2])
    assert request.prompt == ("a", "b") and request.seed == (1, 2) and request.prompts == ["a", "b"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.seed = 3
    assert OutpaintRequest("a", options=OPTIONS, image=IMAGE, pad=[0, 4, 0, 4]).pad == (0, 4, 0, 4)


def test_the_keyword_call_is_the_request_submitted_and_waited_on(tiny_pipe):
    mask = np.zeros((16, 16), bool)
    mask[:8] = True
    called = tiny_pipe.inpaint("a dog", image=IMAGE, mask=mask, seed=3, num_steps=2)
    request = tiny_pipe.request("inpaint", "a dog", image=IMAGE, mask=mask, seed=3, num_steps=2)
    assert isinstance(request, InpaintRequest) and request.options == tiny_pipe.options(num_steps=2, num_candidates=1)
    handle = tiny_pipe.submit(request)
    while not handle.done():  # nobody else drives this engine (`engine.start()` would, on a thread)
        tiny_pipe.engine.tick()
    submitted = handle.result()
    by_hand = tiny_pipe.engine.run(tiny_pipe.task(InpaintRequest(
        "a dog", image=IMAGE, mask=mask, seed=3, options=tiny_pipe.options(num_steps=2, num_candidates=1))))
    assert torch.equal(called.tokens, submitted.tokens) and torch.equal(called.tokens, by_hand.tokens)


def test_a_pipelines_best_of_n_default_applies_to_generation_only(tiny_pipe):
    original = tiny_pipe.config
    picky = dataclasses.replace(original.sampling, num_candidates=3)
    assert tiny_pipe.request("generate", "a", options=picky).options.num_candidates == 3
    tiny_pipe.config = dataclasses.replace(original, sampling=picky)
    try:
        assert tiny_pipe.request("generate", "a").options.num_candidates == 3
        assert tiny_pipe.request("edit", "a", image=IMAGE, strength=0.5).options.num_candidates == 1
        assert tiny_pipe.request("edit", "a", image=IMAGE, strength=0.5, num_candidates=2).options.num_candidates == 2
    finally:
        tiny_pipe.config = original
    with pytest.raises(ValueError, match="unknown task 'paint'"):
        tiny_pipe.request("paint", "a")
    with pytest.raises(TypeError, match="a task is made from a request"):
        tiny_pipe.task({"prompt": "a"})


@pytest.mark.parametrize("task", list(REQUESTS))
def test_every_request_field_is_documented_and_is_a_flag_of_its_command(task, capsys):
    cls = REQUESTS[task]
    assert all(f.metadata["help"] for f in dataclasses.fields(cls))
    with pytest.raises(SystemExit):
        cli.main([task, "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "positional arguments: prompt the text of the image to make" in shown
    for f in dataclasses.fields(cls):
        form = f.metadata["cli"]
        if form and "flag" in form:
            assert f"{form['flag']} " in shown and " ".join(f.metadata["help"].split()[:4]) in shown, f.name


@pytest.mark.parametrize("endpoint", ["/generate", "/inpaint", "/outpaint", "/edit", "/upscale"])
def test_a_server_schema_can_derive_from_the_request_fields(endpoint):
    from muse.server import request_model

    cls = REQUESTS[endpoint.strip("/")]
    fields = request_model(endpoint).model_fields
    derived = {f.name: f for f in request_fields(cls)}
    expected = set(fields) - set(option_names()) - {"stream", "preview_every"}
    assert set(derived) == expected
    for name, f in derived.items():
        assert f.required == fields[name].is_required(), name
        assert f.required or f.default == fields[name].default, name
    assert set(cls.excluded_options) == set(option_names()) - set(fields)
