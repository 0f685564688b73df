"""`SamplingOptions`, defined once: every invalid value is rejected with a message naming it, the limits name
themselves, and the CLI, the server's request schema and the batch manifest list exactly the dataclass's fields."""

import argparse
import dataclasses
import json

import pytest

from muse import cli
from muse.generate import read_manifest
from muse.options import Limits, SamplingOptions, add_option_arguments, given_options, option_flags, option_names
from muse.pipeline import PipelineConfig


@pytest.mark.parametrize("field, value, error, message", [
    ("num_steps", 0, ValueError, "num_steps must be >= 1"),
    ("num_steps", 2.5, TypeError, "num_steps must be an integer"),
    ("num_steps", 10**9, ValueError, "num_steps must be an integer in"),
    ("superres_steps", -1, ValueError, "superres_steps must be >= 1"),
    ("guidance_scale", -1.0, ValueError, "guidance_scale must be a finite number >= 0"),
    ("guidance_scale", float("nan"), ValueError, "guidance_scale must be a finite number"),
    ("guidance_scale", "2", TypeError, "guidance_scale must be a number"),
    ("guidance_schedule", "cubic", ValueError, "guidance_schedule must be one of constant, linear"),
    ("temperature", 0.0, ValueError, "temperature must be a positive finite number >= 0.0001"),
    ("temperature", 5e-324, ValueError, "temperature must be a positive finite number"),
    ("temperature", 1e-300, ValueError, "temperature must be a positive finite number"),
    ("temperature", float("inf"), ValueError, "temperature must be a finite number"),
    ("top_k", 0, ValueError, "top_k must be >= 1"),
    ("top_k", True, TypeError, "top_k must be an integer"),
    ("top_p", 0.0, ValueError, "top_p must be in"),
    ("top_p", 1.5, ValueError, "top_p must be in"),
    ("choice_temperature", -0.5, ValueError, "choice_temperature must be >= 0 and finite"),
    ("mask_schedule", "zigzag", ValueError, "unknown mask schedule 'zigzag'"),
    ("stages", 3, ValueError, "stages must be one of 1, 2"),
    ("num_candidates", 0, ValueError, "num_candidates must be >= 1"),
])
def test_each_invalid_value_is_rejected_naming_it(field, value, error, message):
    with pytest.raises(error, match=message):
        SamplingOptions(**{field: value})


def test_overrides_by_name_and_unknown_names():
    options = SamplingOptions().with_overrides({"num_steps": 12, "top_k": 5})
    assert options.num_steps == 12 and options.top_k == 5 and options.guidance_scale == SamplingOptions().guidance_scale
    with pytest.raises(TypeError, match="unknown sampling option 'num_step'; did you mean 'num_steps'"):
        SamplingOptions().with_overrides({"num_step": 3})


def test_integers_and_floats_are_normalised():
    import numpy as np

    options = SamplingOptions(num_steps=np.int64(7), guidance_scale=3)
    assert type(options.num_steps) is int and type(options.guidance_scale) is float


@pytest.mark.parametrize("call, message", [
    (lambda p: p("a", num_steps=5000), "num_steps=5000 is over the limit max_steps=1000"),
    (lambda p: p("a", superres_steps=1001), "superres_steps=1001 is over the limit max_steps"),
    (lambda p: p("a", num_candidates=65), "num_candidates=65 is over the limit max_candidates=64"),
    (lambda p: p("a", num_images=10**5), "is over the limit max_images=256"),
    (lambda p: p(["a"] * 40, num_images=4, num_candidates=2), r"num_candidates\)=320 is over the limit max_images"),
])
def test_limits_are_named_and_checked_before_any_work(tiny_pipe, monkeypatch, call, message):
    monkeypatch.setattr(tiny_pipe.engine, "run", lambda task: pytest.fail("work started"))
    with pytest.raises(ValueError, match=message):
        call(tiny_pipe)


def test_limits_can_be_raised_in_the_pipeline_config(tiny_pipe):
    roomy = dataclasses.replace(tiny_pipe.config, limits=Limits(max_steps=5000))
    assert roomy.limits.max_steps == 5000
    with pytest.raises(ValueError, match="max_candidates must be >= 1"):
        Limits(max_candidates=0)
    with pytest.raises(ValueError, match="over the limit max_steps=10"):
        PipelineConfig(sampling=SamplingOptions(num_steps=24), limits=Limits(max_steps=10))


def test_a_flat_pipeline_json_of_earlier_versions_still_loads():
    config = PipelineConfig.from_dict({"num_steps": 12, "guidance_scale": 2.0, "seam": 3, "stages": 1})
    assert config.sampling.num_steps == 12 and config.sampling.stages == 1 and config.seam == 3
    with pytest.raises(ValueError, match="unknown config key 'sampling.num_step'"):
        PipelineConfig.from_dict({"sampling": {"num_step": 12}})


def flags_of(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


@pytest.mark.parametrize("command, excluded", [
    ("generate", ()), ("inpaint", ()), ("outpaint", ()), ("edit", ()), ("upscale", ("num_steps", "stages")),
])
def test_every_task_command_has_exactly_one_flag_per_option(command, excluded):
    parser = cli.build_parser([command])
    sub = parser._subparsers._group_actions[0].choices[command]
    flags = flags_of(sub)
    for name in option_names():
        present = {flag for flag in option_flags(name) if flag in flags}
        assert present == (set() if name in excluded else set(option_flags(name))), name


def test_parsed_flags_hold_exactly_what_the_user_set():
    parser = argparse.ArgumentParser()
    add_option_arguments(parser)
    args = parser.parse_args(["--steps", "12", "--top-p", "0.9", "--mask-schedule", "linear"])
    assert given_options(args) == {"num_steps": 12, "top_p": 0.9, "mask_schedule": "linear"}
    assert given_options(parser.parse_args([])) == {}


def test_the_server_schema_lists_every_option():
    from muse.server import TASKS, request_model

    for endpoint, request in TASKS.items():
        fields = set(request_model(endpoint).model_fields)
        assert set(option_names()) & fields == set(option_names()) - set(request.excluded_options), endpoint


def test_the_manifest_records_every_option_resolved(tiny_pipeline_dir, tmp_path):
    cli.main(["generate", "a red apple", "--steps", "2", "--top-k", "3", "--seed", "1", "--out", str(tmp_path / "o"),
              "--model", str(tiny_pipeline_dir)])
    parameters = read_manifest(tmp_path / "o")[0]["parameters"]
    assert set(option_names()) <= set(parameters)
    assert parameters["num_steps"] == 2 and parameters["top_k"] == 3
    json.dumps(parameters)  # plain JSON
