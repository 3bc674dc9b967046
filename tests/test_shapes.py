"""The shapes real Kling answers and callbacks take, read by the wire layer alone (#16)."""

from __future__ import annotations

import json

import pytest

from kling_async import ImageGenerationRequest, MultiImageRequest, ValidationError
from kling_async._wire import request_body

SUBJECT = "https://example.com/subject.png"


# --- requests: fields sent only when set --------------------------------------------------------


def test_model_name_none_is_the_default_and_never_sent_as_null() -> None:
    """Review r14b: an explicit ``model_name=None`` went out as ``"model_name": null``."""
    generation = ImageGenerationRequest(prompt="p", model_name=None)
    multi = MultiImageRequest(subject_images=[SUBJECT], model_name=None)
    assert (generation.model_name, multi.model_name) == ("kling-v3", "kling-v2")
    assert request_body(generation)["model_name"] == "kling-v3"
    assert request_body(multi)["model_name"] == "kling-v2"
    for bad in ("", "  ", 3):
        with pytest.raises(ValidationError, match="model_name"):
            ImageGenerationRequest(prompt="p", model_name=bad)  # type: ignore[arg-type]


def test_fidelity_fields_are_sent_only_when_set() -> None:
    # The gateway and the official API document different defaults: Kling applies its own.
    plain = request_body(ImageGenerationRequest(prompt="p", image=SUBJECT))
    assert "image_fidelity" not in plain
    assert "human_fidelity" not in plain
    assert "null" not in json.dumps(plain)
    set_ = request_body(
        ImageGenerationRequest(
            prompt="p",
            image=SUBJECT,
            image_reference="subject",
            image_fidelity=0.0,
            human_fidelity=0.45,
        )
    )
    assert (set_["image_fidelity"], set_["human_fidelity"]) == (0.0, 0.45)
