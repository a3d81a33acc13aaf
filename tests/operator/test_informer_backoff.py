"""An informer that fails backs off (operator/cache.py ``Informer._run``): a watch the server ends at once
with nothing in it was reopened with no pause (~300,000 watch requests a second), a ``410`` right after
each LIST made a loop of full LISTs, every broken watch connection LISTed everything again, and a
failing LIST was retried every 2 s for ever, uncounted. Now the pauses grow from 0.8 s to 30 s (less a
jitter), start over after a watch that counted, a broken watch resumes from its version, and each
failure is counted. And how long an informer has not heard from the API server is said
(``Informer.stale_for``, ``ClusterCache.stale_for``, ``vnpu_operator_informer_stale_seconds``): a
failing informer kept serving its old store, ``synced`` set, with nothing saying so.

The loop runs in the test's thread on a fake clock: ``wait`` records each pause and moves the clock on,
and the script of answers stops the informer when it runs out."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from vnpu.operator import cache, metrics
from vnpu.operator.cache import ClusterCache

Answer = Callable[[], Any]  # what one request does: returns a response, or raises


class Response:
    """What ``_preload_content=False`` returns: a LIST's ``data``, or a watch's stream of lines."""

    def __init__(self, data: bytes = b"", lines: Callable[[], Iterator[bytes]] | None = None) -> None:
        self.data = data
        self._lines = lines

    def stream(self, amt: Any = None, decode_content: bool = False) -> Iterator[bytes]:
        return self._lines() if self._lines else iter(())

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


class Script:
    """A fake API server answering the informer's LISTs and WATCHes from two scripts, on a fake clock.
    When a script runs out the informer is stopped (so a loop that never pauses still ends)."""

    def __init__(
        self, lists: list[Answer], watches: list[Answer], rand: float = 0.0, name: str = "things"
    ) -> None:
        self.lists, self.watches = list(lists), list(watches)
        self.now = 1000.0
        self.pauses: list[float] = []
        self.requests: list[tuple[str, str | None]] = []  # ("list", None) or ("watch", its version)
        self.stale: list[float] = []  # what stale_for() said as each request was sent
        self.rand = rand
        self.informer: cache.Informer[str] = cache.Informer(
            name, self, _parse, lambda _: None, clock=self.clock, wait=self.wait, rand=lambda: self.rand
        )

    def clock(self) -> float:
        return self.now

    def wait(self, seconds: float) -> bool:
        self.pauses.append(round(seconds, 6))
        self.now += seconds
        if len(self.pauses) > 100:  # a loop gone wrong ends too
            self.informer.stop()
        return self.informer._stop.is_set()

    def __call__(self, **kwargs: Any) -> Any:
        watch = bool(kwargs.get("watch"))
        self.requests.append(("watch", kwargs["resource_version"]) if watch else ("list", None))
        script = self.watches if watch else self.lists
        if not script or len(self.requests) > 200:
            self.informer.stop()
            raise ConnectionResetError("the script is over")
        self.stale.append(round(self.informer.stale_for(), 6))
        return script.pop(0)()

    def run(self) -> None:
        self.informer._run()

    def verbs(self) -> list[str]:
        return [verb for verb, _ in self.requests]


def _parse(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["metadata"]["name"], obj["metadata"].get("resourceVersion", "")


def listed(version: str, *names: str) -> Answer:
    items = [{"metadata": {"name": n}} for n in names]
    return lambda: Response(json.dumps({"metadata": {"resourceVersion": version}, "items": items}).encode())


def failing(error: Exception) -> Answer:
    def answer() -> Any:
        raise error

    return answer


def watched(
    script: Script, *events: dict[str, Any], lasting: float = 0.0, then: Exception | None = None
) -> Answer:
    """A watch that delivers ``events``, stays open ``lasting`` seconds of the fake clock, then ends (by
    raising ``then`` from its stream, if given). What ``stale_for`` says then, while it is still open,
    is appended to ``script.stale``."""

    def lines() -> Iterator[bytes]:
        for event in events:
            yield json.dumps(event).encode() + b"\n"
        script.now += lasting
        script.stale.append(script.informer.stale_for())
        if then is not None:
            raise then

    return lambda: Response(lines=lines)


def event(kind: str, name: str, version: str) -> dict[str, Any]:
    return {"type": kind, "object": {"metadata": {"name": name, "resourceVersion": version}}}


def gone() -> dict[str, Any]:
    return {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old resource version"}}


def errors(verb: str, reason: str) -> float:
    labels = {"verb": verb, "resource": "things", "reason": reason}
    return metrics.REGISTRY.get_sample_value("vnpu_operator_informer_errors_total", labels) or 0.0


def requests(verb: str) -> float:
    labels = {"verb": verb, "resource": "things"}
    return metrics.REGISTRY.get_sample_value("vnpu_operator_api_requests_total", labels) or 0.0


#: The pauses after failure 1, 2, ... in a row with no jitter: 0.8 s doubling, at most 30 s.
GROWING = [0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0]


def test_a_watch_that_ends_at_once_with_nothing_is_reopened_after_a_growing_pause() -> None:
    """An API server shutting down, or a proxy, answers each watch 200 and ends it at once: client-go's
    "very short watch". It is watched again from the same version (no LIST), after 0.8 s, 1.6 s, ..."""
    script = Script([listed("5", "a")], [])
    script.watches = [watched(script) for _ in GROWING]
    before = errors("watch", "short_watch")
    script.run()
    assert script.pauses == GROWING
    assert script.requests == [("list", None)] + [("watch", "5")] * (len(GROWING) + 1)
    assert errors("watch", "short_watch") - before == len(GROWING)
    assert script.informer.get("a") == ""


def test_a_410_right_after_every_list_relists_after_a_growing_pause() -> None:
    """The watch of each LIST's version answers 410 at once (a lagging API server's cache): the LISTs of
    the whole collection back off instead of following each other with no pause."""
    script = Script([], [])
    script.lists = [listed("10", "a") for _ in range(6)]
    script.watches = [watched(script, gone()) for _ in range(6)]
    before = errors("watch", "expired")
    script.run()
    assert script.verbs() == ["list", "watch"] * 6 + ["list"]
    assert script.pauses == GROWING[:6]
    assert errors("watch", "expired") - before == 6


def test_a_410_after_a_watch_that_counted_lists_again_at_once() -> None:
    script = Script([listed("10", "a"), listed("30", "a", "b")], [])
    script.watches = [watched(script, event("ADDED", "c", "20"), lasting=120, then=None)]
    script.watches.append(watched(script, gone()))  # the resumed watch: its version was compacted away
    script.run()
    assert script.requests[:4] == [("list", None), ("watch", "10"), ("watch", "20"), ("list", None)]
    assert script.pauses == [0.8], "only the 410 of a watch that did not count is followed by a pause"
    assert script.informer.get("b") == "" and script.informer.get("c") is None, "the LIST replaced the store"


def test_a_broken_watch_resumes_from_its_last_version_without_a_list() -> None:
    """client-go resumes a watch whose connection broke from the last version it saw; only 410 (or a
    refusal) LISTs again. Before, every broken connection LISTed every pod of the cluster."""
    broken = urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead")
    script = Script([listed("10", "a")], [])
    script.watches = [
        # Delivered an event, then the connection broke: it counted, so it is resumed at once.
        watched(script, {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "11"}}},
                event("MODIFIED", "a", "12"), then=broken),
        # Broke at once, having delivered nothing: resumed after a pause.
        watched(script, then=broken),
        # The server refused to open it (5xx): resumed after a longer pause.
        failing(ApiException(status=503, reason="Service Unavailable")),
        # A bookmark is no event: a watch that only brought one and broke at once did not count.
        watched(script, {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "13"}}}, then=broken),
        # A watch open for a while, nothing changed, then it broke: it counted.
        watched(script, lasting=60, then=urllib3.exceptions.ReadTimeoutError(None, "/", "read timed out")),
    ]  # fmt: skip
    before = errors("watch", "transport"), errors("watch", "http_503")
    script.run()
    assert script.requests == [
        ("list", None),
        ("watch", "10"),
        ("watch", "12"),
        ("watch", "12"),
        ("watch", "12"),
        ("watch", "13"),
        ("watch", "13"),  # the end of the script
    ]
    assert script.pauses == [0.8, 1.6, 3.2], "no pause after a watch that counted"
    assert script.informer.get("a") == "12"
    assert (errors("watch", "transport"), errors("watch", "http_503")) == (before[0] + 4, before[1] + 1)


def test_a_refused_watch_lists_again() -> None:
    """A 4xx other than 429 refuses the request itself (403: the RBAC changed): the informer LISTs."""
    script = Script(
        [listed("10", "a"), listed("11", "a")], [failing(ApiException(status=403, reason="Forbidden"))]
    )
    script.run()
    assert script.verbs()[:3] == ["list", "watch", "list"]
    assert script.pauses[:1] == [0.8]


def test_a_failing_list_backs_off_with_jitter_and_every_try_is_counted() -> None:
    """Before: every 2 s flat, for ever, and neither the failed requests nor the failures counted."""
    down = ApiException(status=500, reason="Internal Server Error")
    script = Script([failing(down)] * 8 + [failing(ConnectionRefusedError("refused"))], [], rand=0.5)
    sent, before = requests("list"), (errors("list", "http_500"), errors("list", "transport"))
    script.run()
    assert script.verbs() == ["list"] * 10
    # Up to a fifth of each pause is taken off at random (here half of that): 30 s is never exceeded.
    assert script.pauses == [round(p * 0.9, 6) for p in [*GROWING, 30.0]]
    assert requests("list") - sent == 10, "a request is counted when it is sent, whatever its answer"
    assert (errors("list", "http_500"), errors("list", "transport")) == (before[0] + 8, before[1] + 1)
    assert not script.informer.synced.is_set()


def test_a_watch_that_counted_starts_the_pauses_over() -> None:
    script = Script([listed("5")], [])
    script.watches = [watched(script) for _ in range(3)]
    script.watches.append(watched(script, lasting=cache.SHORT_WATCH_SECONDS))  # open 1 s: it counted
    script.watches += [watched(script) for _ in range(2)]
    script.run()
    assert script.pauses == [0.8, 1.6, 3.2, 0.8, 1.6]


@pytest.mark.parametrize("rand", [0.0, 0.999])
def test_the_pause_stays_within_its_jitter(rand: float) -> None:
    script = Script([], [], rand=rand)
    for failures, most in enumerate(GROWING, start=1):
        pause = script.informer._pause(failures)
        assert most * (1 - cache.BACKOFF_JITTER) <= pause <= most <= cache.BACKOFF_MOST_SECONDS


# -- how long a store may have missed changes ---------------------------------------------------------


def test_a_failing_list_says_how_long_the_store_it_keeps_serving_has_not_been_current() -> None:
    """The API server goes away after a watch of 100 s: the relists fail, the informer keeps its store
    and stays synced, and stale_for() grows from the end of that watch (0 while it was open)."""
    down = ApiException(status=503, reason="Service Unavailable")
    script = Script([listed("10", "a")] + [failing(down)] * 3, [])
    script.watches = [watched(script, lasting=100, then=ApiException(status=410, reason="Gone"))]
    script.run()
    assert script.verbs() == ["list", "watch", "list", "list", "list", "list"]
    # As each request was answered (and, the third value, once the watch had been open 100 s); then, as
    # the last LIST is sent, after pauses of 0.8, 1.6 and 3.2 s:
    assert script.stale == [0.0, 0.0, 0.0, 0.0, 0.8, 2.4]
    assert script.informer.stale_for() == pytest.approx(5.6)
    assert script.informer.synced.is_set() and script.informer.snapshot() == [""], "the old store, served"


def test_a_watch_that_ends_at_once_with_nothing_is_no_news() -> None:
    script = Script([listed("5", "a")], [])
    script.watches = [watched(script) for _ in range(3)]
    script.run()
    # list, watch (0 while open), pause 0.8, watch, pause 1.6, watch, pause 3.2, the end of the script
    assert script.stale == [0.0, 0.0, 0.0, 0.8, 0.0, 2.4, 0.0]
    assert script.informer.stale_for() == pytest.approx(5.6)


def test_an_event_or_a_bookmark_is_news_and_a_410_is_not() -> None:
    script = Script([listed("10", "a"), failing(ConnectionRefusedError("refused"))], [])
    bookmark = {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "11"}}}
    script.watches = [
        watched(script, bookmark, then=urllib3.exceptions.ProtocolError("broken")),  # at once: no count
        failing(ApiException(status=503, reason="Service Unavailable")),
        watched(script, event("ADDED", "b", "12"), gone()),
    ]
    script.run()
    # list at 1000; watch: its bookmark at 1000, then broke; pause 0.8; watch refused; pause 1.6;
    # watch: its event at 1002.4, then 410 (it counted: an event); LIST at once, refused; pause 0.8.
    assert script.pauses == [0.8, 1.6, 0.8]
    assert script.stale == [0.0, 0.0, 0.0, 0.8, 2.4, 0.0]
    assert script.informer.stale_for() == pytest.approx(0.8)


def test_the_cache_says_its_stalest_informer_and_exports_each_resource() -> None:
    def stale_seconds(resource: str) -> float | None:
        labels = {"resource": resource}
        return metrics.REGISTRY.get_sample_value("vnpu_operator_informer_stale_seconds", labels)

    nodes, models_a, models_b = Script([], []), Script([], [], name="models"), Script([], [], name="models")
    nodes.now, models_a.now, models_b.now = 1002.0, 1007.0, 1003.0  # none has listed: since construction
    cluster = ClusterCache(client.ApiClient(client.Configuration()), ("a", "b"), lambda _: None)
    cluster.informers = [nodes.informer, models_a.informer, models_b.informer]
    assert cluster.stale_for() == 7.0

    unexport = cache.export_staleness(cluster.informers)
    assert (stale_seconds("things"), stale_seconds("models")) == (2.0, 7.0), "the most of a resource's"
    models_a.informer._watching = True  # (its watch opened)
    assert (cluster.stale_for(), stale_seconds("models")) == (3.0, 3.0)
    unexport()
    assert (stale_seconds("things"), stale_seconds("models")) == (None, None), "gone with the cache"
