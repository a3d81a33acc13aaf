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
