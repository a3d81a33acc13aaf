"""The dtype the weights are held at is decided once: the operator sizes them at it and tells the runtime.

Without it the runtime picks its device's default (float32 on CPU) and a weight-holder sized for a
bfloat16 file, or for a quantised one it dequantises, needs twice or more the slices it was given.
"""

from __future__ import annotations

import pytest
from test_planner import model, node, run

from vnpu import api


def _env_of_created(spec: dict) -> list[dict[str, str]]:
    plan = run([model("m", 1, **spec)], [node("n1")])
    return [{e["name"]: e.get("value") for e in p["spec"]["containers"][0]["env"]} for p in plan.create]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, api.DTYPE_FROM_FILE),  # unset: as the estimate sized it (vnpu.memory.load_dtype)
        ({"weights": {"dtype": "float16"}}, "float16"),
        ({"runtime": {"image": "mine:1"}}, None),  # another runtime loads as it likes
        ({"weights": {"dtype": "q4_1"}, "runtime": {"image": "mine:1"}}, None),
    ],
)
def test_every_model_pod_is_told_the_dtype_its_weights_were_sized_at(spec, expected) -> None:
    envs = _env_of_created(spec)
    assert len(envs) == 2  # the holder and the replica
    assert {env.get("VNPU_MODEL_DTYPE") for env in envs} == {expected}
