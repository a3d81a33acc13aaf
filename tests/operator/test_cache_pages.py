"""The informers LIST in pages (operator/cache.py ``list_pages``): one unpaginated LIST of every pod of a
shared cluster held its whole body, as bytes and parsed, at once, and OOMKilled the operator (10,000
pods: over 1 GiB against the chart's 512Mi). Each page is converted before the next is asked for; an
expired continue token lists again from the first page, and a second expiry reads the list whole, once
(client-go's pager ``FullListIfExpired``), instead of starting over for ever."""

from __future__ import annotations

import json
import threading
import urllib.parse
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from apiserver_stub import ApiServerStub
from kubernetes.client.exceptions import ApiException

from vnpu.operator import cache, metrics
from vnpu.operator.cache import ClusterCache, list_pages


class Response:
    """What ``_preload_content=False`` returns, as far as a list reads it."""

    def __init__(self, body: Mapping[str, Any]) -> None:
        self.data = json.dumps(body).encode()


class PagedServer:
    """A list call serving ``snapshots`` in pages of its ``limit`` (whole without one); the continue
    token is ``<snapshot>:<offset>``. Tokens of a snapshot in ``expired`` answer 410, as the API server
    does once it compacted past the snapshot."""

    def __init__(self, *snapshots: list[dict[str, Any]]) -> None:
        self.snapshots = snapshots
        self.current = 0
        self.expired: set[int] = set()
        self.calls: list[dict[str, Any]] = []
        self.responses: list[weakref.ref[Response]] = []
        self.held_at_a_request: list[int] = []  # responses still alive when each request was made

    def __call__(self, **kwargs: Any) -> Response:
        self.calls.append(kwargs)
        self.held_at_a_request.append(sum(ref() is not None for ref in self.responses))
        limit = kwargs.get("limit")
        token = kwargs.get("_continue")
        if token:
            snapshot, offset = (int(part) for part in token.split(":"))
            if snapshot in self.expired:
                raise ApiException(status=410, reason="Expired")
        else:
            snapshot, offset = self.current, 0
        end = len(self.snapshots[snapshot]) if limit is None else offset + limit
        items = self.snapshots[snapshot][offset:end]
        meta: dict[str, Any] = {"resourceVersion": f"rv-{snapshot}"}
        if end < len(self.snapshots[snapshot]):
            meta["continue"] = f"{snapshot}:{end}"
        resp = Response({"kind": "List", "metadata": meta, "items": items})
        self.responses.append(weakref.ref(resp))
        return resp


class CompactingServer(PagedServer):
    """A server that compacts right after every first page, as one does whose pages take longer to read
    than it keeps a snapshot: every continue token expires, and each list sees a newer snapshot."""

    def __call__(self, **kwargs: Any) -> Response:
        if len(self.calls) >= 10:
            raise AssertionError(f"still listing after {len(self.calls)} requests: {self.calls}")
        resp = super().__call__(**kwargs)
        if "limit" in kwargs and not kwargs.get("_continue"):
            self.expired.add(self.current)
            self.current = min(self.current + 1, len(self.snapshots) - 1)
        return resp


def unpaginated_lists(resource: str) -> float:
    value = metrics.REGISTRY.get_sample_value("vnpu_operator_unpaginated_lists_total", {"resource": resource})
    return value or 0.0


def objects(prefix: str, count: int) -> list[dict[str, Any]]:
    return [
        {"metadata": {"name": f"{prefix}{i:02d}", "managedFields": [{"manager": "x"}]}} for i in range(count)
    ]


def name(obj: Mapping[str, Any]) -> str:
    return str(obj["metadata"]["name"])


@pytest.fixture
def page_of_five(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(cache, "LIST_PAGE_SIZE", 5)
    yield


def test_a_list_asks_for_pages_follows_continue_and_holds_one_response_at_a_time(page_of_five) -> None:
    server = PagedServer(objects("a", 12))
    kept, version = list_pages(server, name, "things", threading.Event())
    assert kept == [f"a{i:02d}" for i in range(12)]
    assert version == "rv-0"
    assert [call["limit"] for call in server.calls] == [5, 5, 5]
    assert [call.get("_continue") for call in server.calls] == [None, "0:5", "0:10"]
    assert all(call["_request_timeout"] == cache.LIST_TIMEOUT for call in server.calls)
    # Each page's response (its bytes) is gone before the next page is asked for.
    assert server.held_at_a_request == [0, 0, 0]


def test_a_converter_dropping_objects_keeps_only_the_rest(page_of_five) -> None:
    server = PagedServer(objects("a", 7))
    kept, _ = list_pages(server, lambda o: None if name(o).endswith("3") else name(o), "t", threading.Event())
    assert kept == [f"a{i:02d}" for i in range(7) if i != 3]


def test_an_expired_continue_token_lists_again_from_the_first_page(page_of_five) -> None:
    server = PagedServer(objects("old", 12), objects("new", 8))

    def convert(obj: Mapping[str, Any]) -> str:
        if name(obj) == "old05":  # the second page of the first snapshot: the server compacts now
            server.expired.add(0)
            server.current = 1
        return name(obj)

    before = unpaginated_lists("things")
    kept, version = list_pages(server, convert, "things", threading.Event())
    assert kept == [f"new{i:02d}" for i in range(8)], "nothing of the expired snapshot is kept"
    assert version == "rv-1"
    assert [call.get("_continue") for call in server.calls] == [None, "0:5", "0:10", None, "1:5"]
    # One expiry only pages again: nothing is read whole.
    assert all(call["limit"] == 5 for call in server.calls)
    assert unpaginated_lists("things") == before


def test_a_list_whose_pages_expire_twice_is_read_whole_once(page_of_five, caplog) -> None:
    """Reading the pages takes longer than the server keeps a snapshot: paging again would expire
    again, for ever, and the operator would never sync. The second expiry lists once without limit."""
    server = CompactingServer(objects("first", 12), objects("second", 12), objects("whole", 13))
    before = unpaginated_lists("things")

    kept, version = list_pages(server, name, "things", threading.Event())

    assert [(call.get("limit"), call.get("_continue")) for call in server.calls] == [
        (5, None),
        (5, "0:5"),  # 410: listed again in pages
        (5, None),
        (5, "1:5"),  # 410 again: read whole
        (None, None),
    ]
    assert "limit" not in server.calls[-1] and "_continue" not in server.calls[-1]
    assert server.calls[-1]["_request_timeout"] == cache.LIST_TIMEOUT
    assert kept == [f"whole{i:02d}" for i in range(13)], "every object of one snapshot, none of the expired"
    assert version == "rv-2", "the version of the snapshot read whole, to watch from"
    assert unpaginated_lists("things") == before + 1
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "things" in r.getMessage()]
    assert len(warnings) == 1 and "without pages" in warnings[0].getMessage()


def test_a_410_on_the_first_page_is_the_callers() -> None:
    def gone(**_: Any) -> Response:
        raise ApiException(status=410, reason="Gone")

    with pytest.raises(ApiException):
        list_pages(gone, name, "things", threading.Event())


def test_a_stopped_informer_asks_for_no_further_page(page_of_five) -> None:
    server = PagedServer(objects("a", 12))
    stop = threading.Event()

    def convert(obj: Mapping[str, Any]) -> str:
        stop.set()
        return name(obj)

    with pytest.raises(cache._Stopped):
        list_pages(server, convert, "things", stop)
    assert len(server.calls) == 1


def test_the_informer_keeps_every_page_and_watches_from_the_lists_version(page_of_five) -> None:
    server = PagedServer(objects("a", 12))
    watched: list[dict[str, Any]] = []
    lists: list[dict[str, Any]] = []

    def list_call(**kwargs: Any) -> Any:
        if kwargs.get("watch"):
            watched.append(kwargs)
            raise ApiException(status=500, reason="no watch here")  # the informer lists again later
        lists.append(kwargs)
        return server(**kwargs)

    informer: cache.Informer[str] = cache.Informer("things", list_call, lambda o: (name(o), name(o)), print)
    informer.start()
    try:
        assert informer.synced.wait(10)
        assert sorted(informer.snapshot()) == [f"a{i:02d}" for i in range(12)]
    finally:
        informer.stop()
        assert informer.join(10)
    assert watched and watched[0]["resource_version"] == "rv-0"
    assert all("limit" not in w and "_continue" not in w for w in watched)


def test_every_informer_list_of_the_cluster_cache_carries_a_limit() -> None:
    """Through the real client: the query of every LIST the operator's caches send has ``limit``."""
    stub = ApiServerStub()
    stub.lists["pods"] = [{"metadata": {"name": "p", "namespace": "ns"}, "spec": {}, "status": {}}]
    api_client = stub.api_client()
    clusters = [
        ClusterCache(api_client, (), lambda _: None),
        ClusterCache(api_client, ("a", "b"), lambda _: None),
    ]
    try:
        for cluster in clusters:
            cluster.start()
            assert cluster.wait_synced(10)
    finally:
        for cluster in clusters:
            cluster.stop()
        stub.close()
    lists = [
        urllib.parse.urlsplit(path) for method, path, watch in stub.requests if method == "GET" and not watch
    ]
    # nodes, pods, models, services, budgets; then each of two namespaces' models, services and budgets
    assert len({url.path for url in lists}) == 5 + 6
    for url in lists:
        assert urllib.parse.parse_qs(url.query).get("limit") == [str(cache.LIST_PAGE_SIZE)], url
