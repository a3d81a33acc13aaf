"""The operator's per-model series go with their model (a deleted model's gauges must not report its
last value forever, nor a tenant's create/delete churn grow the scrape without end)."""

from __future__ import annotations

from prometheus_client import generate_latest

from vnpu.operator import metrics


def series(model: str) -> list[str]:
    text = generate_latest(metrics.REGISTRY).decode()
    return [line for line in text.splitlines() if f'model="{model}"' in line and not line.startswith("#")]


def test_forget_models_removes_every_series_of_a_gone_model_and_keeps_the_live() -> None:
    for name in ("kept", "gone"):
        metrics.PLACED_REPLICAS.labels("team-a", name).set(2)
        metrics.UNPLACED_REPLICAS.labels("team-a", name).set(1)
        metrics.SAVED_BY_SHARING_MIB.labels("team-a", name).set(512)
        metrics.API_ERRORS.labels("team-a", name, "Forbidden").inc()
        metrics.API_ERRORS.labels("team-a", name, "Invalid").inc()
        metrics.SCALED_TO_ZERO.labels("team-a", name).inc()
    # The same name in another namespace is another model.
    metrics.PLACED_REPLICAS.labels("team-b", "gone").set(3)
    kept_before = series("kept")

    removed = metrics.forget_models({("team-a", "kept"), ("team-b", "gone")})

    assert removed == 6
    assert series("kept") == kept_before
    assert series("gone") == ['vnpu_operator_placed_replicas{model="gone",namespace="team-b"} 3.0']
    assert metrics.forget_models({("team-a", "kept"), ("team-b", "gone")}) == 0
    metrics.forget_models(set())
    assert series("kept") == series("gone") == []


def test_a_late_count_for_a_gone_model_is_removed_by_the_next_pass() -> None:
    tracker = metrics.ModelSeries()
    metrics.PLACED_REPLICAS.labels("team-a", "late").set(1)
    assert tracker.after_pass({("team-a", "late")}) == 0
    assert tracker.after_pass(set()) >= 1  # the model went: its series with it
    assert series("late") == []
    # The reporter's thread, still writing the status that pass planned, meets a refusal after that.
    tracker.count_api_error("team-a", "late", "NotFound")
    assert series("late") != []
    assert tracker.after_pass(set()) >= 1  # no model went in this pass, yet the revived series goes
    assert series("late") == []
    assert tracker.after_pass(set()) == 0  # and no scan is due after that


def test_no_scan_while_no_model_goes() -> None:
    tracker = metrics.ModelSeries()
    metrics.PLACED_REPLICAS.labels("team-a", "stays").set(1)
    tracker.after_pass({("team-a", "stays")})
    tracker.count_api_error("team-a", "stays", "Conflict")  # a live model's count is kept
    assert tracker.after_pass({("team-a", "stays"), ("team-a", "new")}) == 0
    assert len(series("stays")) == 3  # the gauge, the counter and its _created
    metrics.forget_models(set())


def test_a_gone_model_s_series_go_by_their_labels_without_a_scan(monkeypatch) -> None:
    """A scan of every series cost 0.63 s per deletion at 50,000 models: the pass removes by label."""
    tracker = metrics.ModelSeries()
    for name in ("stays", "goes"):
        metrics.PLACED_REPLICAS.labels("team-a", name).set(1)
        metrics.SCALED_TO_ZERO.labels("team-a", name).inc()
        for reason in ("Forbidden", "Invalid"):
            tracker.count_api_error("team-a", name, reason)
    tracker.after_pass({("team-a", "stays"), ("team-a", "goes")})
    stays = series("stays")

    def no_scan(*_args: object) -> None:
        raise AssertionError("the series were scanned")

    for metric, _names in metrics.PER_MODEL:
        monkeypatch.setattr(metric, "collect", no_scan)
    assert tracker.after_pass({("team-a", "stays")}) == 1
    monkeypatch.undo()
    assert series("goes") == []
    assert series("stays") == stays
    metrics.forget_models(set())
