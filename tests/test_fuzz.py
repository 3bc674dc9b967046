"""Fuzzing the pure layers with hypothesis.

- Any response (status, body, headers) only ever parses or raises a
  ``KlingError`` subclass: never a ``KeyError``, ``TypeError`` or a JSON error.
- Any request built from the seeds' constraints is accepted by the fake
  server's own validator (written against the wire format, independently of the
  SDK's models), and a request breaking one constraint raises ``ValidationError``
  naming the field, before anything could be sent.

CI runs the ``ci`` profile (a few hundred examples per test). The dedicated run,
10,000 examples per test, is::

    HYPOTHESIS_PROFILE=fuzz .venv/bin/python -m pytest tests/test_fuzz.py \\
        -p no:cacheprovider --hypothesis-show-statistics
"""

from __future__ import annotations

import base64
import contextlib
import json
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kling_async import (
    ImageGenerationRequest,
    KlingError,
    MultiImageRequest,
    ValidationError,
)
from kling_async._models import ASPECT_RATIOS, IMAGE_REFERENCES, RESOLUTIONS
from kling_async._resources import read_image_files
from kling_async._wire import (
    Envelope,
    parse_created,
    parse_envelope,
    parse_task,
    parse_task_list,
    request_body,
)
from kling_async.testing import FakeKlingServer, encode_png
from kling_async.testing._protocol import GENERATIONS, MULTI_IMAGE
from kling_async.testing._validation import Rejection, validate_create
from tests.helpers import API_KEY, make_client

# --- responses --------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
statuses = st.sampled_from(["submitted", "processing", "succeed", "failed", "", "queued"])
millis = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.none(),
)
images = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "index": st.one_of(st.integers(), st.text(max_size=4), st.none(), st.booleans()),
            "url": st.one_of(st.text(max_size=30), st.none(), st.integers()),
            "watermark_url": st.one_of(st.text(max_size=10), st.none(), st.floats()),
            "id": st.text(max_size=4),
        },
    )
    | json_values,
    max_size=4,
)
tasks = st.fixed_dictionaries(
    {},
    optional={
        "task_id": st.one_of(st.text(max_size=24), st.integers(), st.none(), json_values),
        "task_status": st.one_of(statuses, json_values),
        "task_status_msg": st.one_of(st.text(max_size=20), json_values),
        "task_info": st.one_of(
            st.fixed_dictionaries({}, optional={"external_task_id": json_scalars}), json_values
        ),
        "task_result": st.one_of(st.fixed_dictionaries({"images": images}), json_values),
        "created_at": millis,
        "updated_at": millis,
        "final_unit_deduction": json_values,
    },
)
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "code": st.one_of(
            st.sampled_from([0, 1002, 1102, 1201, 1203, 1301, 1302, 1303, 5000]),
            st.integers(),
            json_values,
        ),
        "message": json_values,
        "request_id": json_values,
        "data": st.one_of(tasks, st.lists(tasks, max_size=3), json_values),
    },
)
bodies = st.one_of(
    envelopes.map(lambda value: json.dumps(value).encode()),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=200),
)
headers = st.dictionaries(
    st.sampled_from(["Retry-After", "Content-Type", "X-Other"]),
    st.one_of(
        st.text(max_size=40),
        st.floats(allow_nan=True).map(str),
        st.just("Wed, 21 Oct 2015 07:28:00 GMT"),
    ),
    max_size=3,
)


@given(status=st.integers(min_value=100, max_value=599), body=bodies, headers=headers)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_any_response_parses_or_raises_a_kling_error(
    status: int, body: bytes, headers: dict[str, str]
) -> None:
    try:
        envelope = parse_envelope(status, body, headers)
    except KlingError:
        return
    for parse in (parse_task, parse_created, parse_task_list):
        with contextlib.suppress(KlingError):
            parse(envelope)


@given(data=st.one_of(tasks, json_values))
def test_any_task_data_parses_or_raises_a_kling_error(data: Any) -> None:
    envelope = Envelope(data=data, request_id="r")
    for parse in (parse_task, parse_created):
        try:
            task = parse(envelope)
        except KlingError:
            continue
        assert task.task_id


# --- requests ------------------------------------------------------------------------------

_PNG = base64.b64encode(encode_png(320, 400)).decode()
_WIDE_PNG = base64.b64encode(encode_png(750, 300)).decode()
image_inputs = st.sampled_from(
    ["https://example.com/a.png", "http://cdn.example.org/x/y.jpg?sig=1", _PNG, _WIDE_PNG]
)
prompts = st.text(min_size=1, max_size=2500).filter(lambda text: text.strip() != "")
fractions = st.floats(min_value=0, max_value=1)
element_ids = st.lists(st.integers(min_value=0, max_value=2**63 - 1), max_size=10)
optional_text = st.none() | st.text(max_size=2500)
ids = st.text(alphabet=string.ascii_letters + string.digits + "-_#/?%", min_size=1, max_size=64)
callback_urls = st.sampled_from(
    ["https://hooks.example.com/kling", "http://127.0.0.1:8080/cb/abc?token=1"]
)


@st.composite
def generation_fields(draw: st.DrawFn) -> dict[str, Any]:
    image = draw(st.none() | image_inputs)
    elements = draw(element_ids)
    if image is not None:
        elements = elements[:9]
    fields: dict[str, Any] = {
        "prompt": draw(prompts),
        "model_name": draw(st.sampled_from(["kling-v3", "kling-v2-1", "kling-v1-5"])),
        "negative_prompt": None if image is not None else draw(optional_text),
        "image": image,
        "image_reference": draw(st.sampled_from(IMAGE_REFERENCES)) if image else None,
        "image_fidelity": draw(st.none() | fractions),
        "human_fidelity": draw(st.none() | fractions),
        "element_ids": elements,
        "resolution": draw(st.none() | st.sampled_from(RESOLUTIONS)),
        "n": draw(st.integers(min_value=1, max_value=9)),
        "aspect_ratio": draw(st.sampled_from(ASPECT_RATIOS)),
        "watermark": draw(st.none() | st.booleans()),
        "callback_url": draw(st.none() | callback_urls),
        "external_task_id": draw(st.none() | ids.filter(lambda text: text.strip() != "")),
    }
    return {name: value for name, value in fields.items() if value is not None}


@st.composite
def multi_image_fields(draw: st.DrawFn) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "subject_images": draw(st.lists(image_inputs, min_size=1, max_size=4)),
        "prompt": draw(optional_text),
        "model_name": draw(st.sampled_from(["kling-v2", "kling-v2-1"])),
        "scene_image": draw(st.none() | image_inputs),
        "style_image": draw(st.none() | image_inputs),
        "n": draw(st.integers(min_value=1, max_value=9)),
        "aspect_ratio": draw(st.sampled_from(ASPECT_RATIOS)),
        "watermark": draw(st.none() | st.booleans()),
        "external_task_id": draw(st.none() | ids.filter(lambda text: text.strip() != "")),
    }
    return {name: value for name, value in fields.items() if value is not None}


@given(fields=generation_fields())
def test_valid_generation_requests_pass_the_fake_servers_validator(fields: dict[str, Any]) -> None:
    body = request_body(ImageGenerationRequest(**fields))
    validate_create(GENERATIONS, json.loads(json.dumps(body)), None)


@given(fields=multi_image_fields())
def test_valid_multi_image_requests_pass_the_fake_servers_validator(
    fields: dict[str, Any],
) -> None:
    body = request_body(MultiImageRequest(**fields))
    validate_create(MULTI_IMAGE, json.loads(json.dumps(body)), None)


# One broken constraint at a time: (field, a value that breaks it).
_BREAKS: list[tuple[str, st.SearchStrategy[Any]]] = [
    ("prompt", st.text(min_size=2501, max_size=2600) | st.just("   ") | st.integers()),
    ("negative_prompt", st.text(min_size=2501, max_size=2600)),
    ("n", st.integers().filter(lambda n: not 1 <= n <= 9) | st.just(True) | st.just("2")),
    ("aspect_ratio", st.text(max_size=6).filter(lambda text: text not in ASPECT_RATIOS)),
    ("resolution", st.text(max_size=4).filter(lambda text: text not in RESOLUTIONS)),
    ("image_fidelity", st.floats().filter(lambda x: not 0 <= x <= 1) | st.just("0.5")),
    ("human_fidelity", st.floats().filter(lambda x: not 0 <= x <= 1)),
    ("image_reference", st.text(max_size=8).filter(lambda text: text not in IMAGE_REFERENCES)),
    ("callback_url", st.sampled_from(["ftp://x/y", "not a url", "https://", "//host/path"])),
    ("watermark", st.sampled_from([1, "yes", 0.0])),
    ("model_name", st.sampled_from(["", "   ", 7])),
    ("external_task_id", st.sampled_from(["", "  ", 5])),
    ("element_ids", st.lists(st.integers(max_value=-1), min_size=1, max_size=3)),
    (
        "image",
        st.sampled_from(["bm90IGFuIGltYWdl", base64.b64encode(encode_png(100, 100)).decode()]),
    ),
]


@given(
    fields=generation_fields(),
    broken=st.sampled_from(_BREAKS).flatmap(lambda pair: st.tuples(st.just(pair[0]), pair[1])),
)
def test_a_broken_constraint_raises_validation_error_naming_the_field(
    fields: dict[str, Any], broken: tuple[str, Any]
) -> None:
    name, value = broken
    fields[name] = value
    if name == "image":  # the other rules an image brings still hold
        fields.pop("negative_prompt", None)
        fields["element_ids"] = fields.get("element_ids", [])[:9]
    assume(not (name == "image_reference" and "image" not in fields))
    with pytest.raises(ValidationError) as caught:
        read_image_files(ImageGenerationRequest(**fields))  # built, then its files read
    assert caught.value.field.split("[")[0] == name


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": "x" * 2501},
        {"prompt": "p", "n": 10},
        {"prompt": "p", "aspect_ratio": "5:4"},
        {"prompt": "p", "image_fidelity": 1.5},
        {"prompt": "p", "image_reference": "face"},
        {"prompt": "p", "element_ids": [-1]},
        {"prompt": "p", "callback_url": "ftp://example.com/cb"},
    ],
)
async def test_an_invalid_request_sends_nothing(fields: dict[str, Any]) -> None:
    async with FakeKlingServer(api_key=API_KEY) as server:
        async with make_client(server) as client:
            with pytest.raises(ValidationError):
                await client.images.generate(**fields)
        assert server.requests == []


def test_the_fake_validator_is_not_a_pushover() -> None:
    # The property above would pass trivially if the validator accepted anything.
    with pytest.raises(Rejection):
        validate_create(GENERATIONS, {"prompt": "p", "model_name": "m", "n": 10}, None)
