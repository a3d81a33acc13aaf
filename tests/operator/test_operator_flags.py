"""The operator's command line refuses settings that would break every pass later."""

from __future__ import annotations

import pytest

from vnpu.operator.main import build_parser, config_from_args


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-0.1", "1.5"])
def test_a_keep_warm_fraction_outside_0_to_1_is_refused_at_the_start(value: str) -> None:
    """It sizes every pool's keep-warm budget (``int(total * fraction)``): NaN or an infinity raised
    there on every pass, for every tenant."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--keep-warm-fraction", value])


@pytest.mark.parametrize("value", ["0", "0.2", "1"])
def test_a_keep_warm_fraction_in_0_to_1_is_taken(value: str) -> None:
    args = build_parser().parse_args(["--keep-warm-fraction", value])
    assert config_from_args(args).keep_warm_fraction == float(value)


@pytest.mark.parametrize(
    "argv",
    [
        ["--resync-seconds", "nan"],  # max(3 x nan, floor) is nan: the liveness limit was never reached
        ["--resync-seconds", "0"],
        ["--lease-duration", "inf"],
        ["--retry-period", "-1"],
        ["--estimate-timeout", "0"],
        ["--estimate-timeout", "nan"],
        ["--estimate-workers", "0"],
    ],
)
def test_intervals_that_are_no_number_of_seconds_are_refused_at_the_start(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["--renew-deadline", "20"],  # past the 15 s Lease: a standby may lead while this one still writes
        ["--lease-duration", "10"],
        ["--retry-period", "10"],
    ],
)
def test_lease_timings_that_would_allow_two_writers_are_refused(argv: list[str]) -> None:
    from vnpu.operator.main import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2


def test_the_estimate_settings_reach_the_config() -> None:
    args = build_parser().parse_args(["--estimate-workers", "3", "--estimate-timeout", "5"])
    config = config_from_args(args)
    assert (config.estimate_workers, config.estimate_timeout_seconds) == (3, 5.0)


def test_image_pull_secrets_reach_every_model_pod_and_none_without_them() -> None:
    """Replicas, weight-holders and placeholders all pull an image: each names the Secrets; a pod made
    with no such flag has no imagePullSecrets key (pods made before the option look the same)."""
    from dataclasses import replace

    from test_planner import CONFIG, as_pods, estimate, model, node, run

    args = build_parser().parse_args(
        ["--image-pull-secret", "regcred", "--image-pull-secret", "mirror.creds"]
    )
    config = replace(CONFIG, image_pull_secrets=config_from_args(args).image_pull_secrets)
    assert config.image_pull_secrets == ("regcred", "mirror.creds")
    m = model("big", 3)
    est = {m.key: estimate(weights=12 * 1024, per_replica=3 * 1024)}
    placed = run([m], [node("n1", devices=1)], estimates=est, config=config)
    pending = run([m], [node("n1", devices=1)], as_pods(placed.create), estimates=est, config=config)
    pods = placed.create + pending.create
    roles = {p["metadata"]["labels"]["vnpu.io/role"] for p in pods}
    assert roles == {"replica", "weights", "placeholder"}
    assert all(p["spec"]["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror.creds"}] for p in pods)
    assert all(
        "imagePullSecrets" not in p["spec"] for p in run([m], [node("n1", devices=1)], estimates=est).create
    )


@pytest.mark.parametrize("name", ["Regcred", "reg_cred", "-x", "x" * 254, ""])
def test_an_image_pull_secret_that_is_no_secret_name_is_refused_at_the_start(name: str) -> None:
    """Else every model pod's create would be a 422, model by model."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--image-pull-secret", name])
