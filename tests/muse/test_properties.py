"""Property-based: whatever option values and image / mask shapes a caller passes, the pipeline either gives a valid
result or raises one of its documented errors (ValueError or TypeError, naming the problem) -- never a traceback from
inside torch, never a silent wrong shape."""

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from muse.options import option_names
from sampling import SCHEDULES

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                    derandomize=True)

numbers = st.one_of(st.integers(-3, 30), st.floats(allow_nan=True, allow_infinity=True), st.none(), st.booleans(),
                    st.just("2"))
options = st.fixed_dictionaries({}, optional={
    "num_steps": numbers, "superres_steps": numbers, "guidance_scale": numbers, "temperature": numbers,
    "top_k": numbers, "top_p": st.one_of(numbers, st.floats(0, 1)), "choice_temperature": numbers,
    "num_candidates": st.integers(-1, 3), "stages": st.sampled_from([None, 0, 1, 2, 3]),
    "guidance_schedule": st.sampled_from(["constant", "linear", "cubic", ""]),
    "mask_schedule": st.sampled_from(list(SCHEDULES) + ["zigzag"]),
})


def documented(error: Exception) -> None:
    """One of our errors: a ValueError or TypeError whose message names what is wrong (an option, a limit, an input)."""
    assert isinstance(error, (ValueError, TypeError)), f"{type(error).__name__}: {error}"
    message = str(error)
    words = [*option_names(), "limit", "image", "mask", "prompt", "num_images", "seed", "stage", "pad"]
    assert any(word in message for word in words), message


@SETTINGS
@given(options=options, num_images=st.integers(-1, 3))
def test_any_option_values_give_images_or_a_documented_error(tiny_pipe, options, num_images):
    try:
        out = tiny_pipe("a red apple", num_images=num_images, seed=0, **options)
    except Exception as error:  # noqa: BLE001 - the property is about which errors
        documented(error)
        return
    assert len(out.images) == num_images and out.tokens.shape == (num_images, 4, 4)
    assert int(out.tokens.max()) < tiny_pipe.transformer.config.codebook_size  # no mask token left


@SETTINGS
@given(height=st.integers(0, 40), width=st.integers(0, 40), mask_height=st.integers(0, 40),
       mask_width=st.integers(0, 40), kind=st.sampled_from(["uint8", "float", "bool", "tensor"]),
       masks=st.integers(1, 3), images=st.integers(1, 3))
def test_any_image_and_mask_shapes_give_an_edit_or_a_documented_error(tiny_pipe, height, width, mask_height,
                                                                        mask_width, kind, masks, images):
    rng = np.random.default_rng(height * 41 + width)
    image = rng.integers(0, 256, (images, height, width, 3)).astype(np.uint8)
    mask = rng.random((masks, mask_height, mask_width)) > 0.5
    mask = {"uint8": mask.astype(np.uint8) * 255, "float": mask.astype(np.float32), "bool": mask,
            "tensor": torch.from_numpy(mask)}[kind]
    try:
        out = tiny_pipe.inpaint("a cat", image=list(image), mask=list(mask) if kind != "tensor" else mask, seed=0,
                                num_steps=2)
    except Exception as error:  # noqa: BLE001
        documented(error)
        return
    assert len(out.images) == max(images, masks) and out.images[0].size == (width, height)


@SETTINGS
@given(pad=st.tuples(*[st.integers(-8, 24)] * 4), side=st.sampled_from([0, 4, 8, 12, 16, 20]))
def test_any_pad_gives_an_outpainting_or_a_documented_error(tiny_pipe, pad, side):
    try:
        out = tiny_pipe.outpaint("sky", image=np.zeros((side, 16, 3), np.uint8), pad=pad, seed=0, num_steps=2)
    except Exception as error:  # noqa: BLE001
        documented(error)
        return
    assert out.images[0].size == (16 + pad[0] + pad[2], side + pad[1] + pad[3])
