"""The guard's pieces, fast; tests/test_attack.py and tests/test_serve.py replay the attacks
against a real `dogbreeds serve`."""

import pytest

from dogbreeds import guard


@pytest.mark.parametrize("header, allowed", [
    ("127.0.0.1:8000", True), ("localhost", True), ("[::1]:8000", True), ("LOCALHOST:1", True),
    ("evil.example", False), ("127.0.0.1.evil.example", False), ("", False), ("localhost.:80", False),
])
def test_host_allowed_by_default(header, allowed):
    assert guard.host_allowed(header, ("127.0.0.1", "localhost", "::1")) is allowed


def test_host_wildcards():
    assert guard.host_allowed("anything:1", ("*",))
    assert guard.host_allowed("dogs.example.com", ("*.example.com",))
    assert not guard.host_allowed("example.com.evil", ("*.example.com",))
    assert not guard.host_allowed("evilexample.com", ("*.example.com",))


def test_count_parts_counts_the_files_of_a_multipart_body():
    import httpx

    for files in (1, 5, 1000):
        request = httpx.Request("POST", "http://x/", files=[("files", (f"{i}.jpg", b"--x", "image/jpeg"))
                                                              for i in range(files)])
        body = request.read()
        assert guard.count_parts(body, request.headers["content-type"]) == files
        # The boundary as the app's parser reads it, however it is spelled.
        spaced = request.headers["content-type"].replace("boundary=", "BOUNDARY =")
        assert guard.count_parts(body, spaced) == files
    assert guard.count_parts(b"{}", "application/json") == 0
    with pytest.raises(guard.Refused) as refused:
        guard.count_parts(b"--x\r\n", "multipart/form-data")
    assert refused.value.status_code == 400


def test_route_is_the_path_inside_the_app():
    assert guard.route({"path": "/bench/predict", "root_path": "/bench"}) == "/predict"
    assert guard.route({"path": "/predict", "root_path": ""}) == "/predict"
    assert guard.route({"path": "/bench", "root_path": "/bench"}) == "/"


def test_a_client_is_an_address_or_an_ipv6_slash_64():
    assert guard.client_key("127.0.0.3") == "127.0.0.3"
    assert guard.client_key("2001:db8:1:2:aaaa::1") == guard.client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert guard.client_key("2001:db8:1:3::1") != guard.client_key("2001:db8:1:2::1")
    assert guard.client_key("::ffff:10.0.0.7") == "10.0.0.7"
    assert guard.client_key("fe80::1%eth0") == "fe80::/64"
    assert guard.client_key("unknown") == "unknown"


@pytest.mark.parametrize("origin, host, same", [
    ("http://127.0.0.1:8000", "127.0.0.1:8000", True), ("https://Dogs.Example", "dogs.example", True),
    ("http://localhost:1", "localhost:8000", False), ("http://evil.example", "127.0.0.1:8000", False),
    ("null", "127.0.0.1:8000", False), ("file://", "127.0.0.1", False),
])
def test_same_origin(origin, host, same):
    assert guard.same_origin(origin, host) is same
