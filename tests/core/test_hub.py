"""The hub probe connects where a request would go first: the endpoint, or the HTTPS proxy."""
from lrcompress.core.hub import _probe_address


def test_the_probe_goes_to_the_endpoint_without_a_proxy(monkeypatch):
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert _probe_address("https://huggingface.co") == ("huggingface.co", 443)
    assert _probe_address("http://127.0.0.1:9") == ("127.0.0.1", 9)


def test_the_probe_goes_to_the_proxy_unless_the_host_bypasses_it(monkeypatch):
    for name in ("HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    monkeypatch.setenv("no_proxy", "internal.example")
    assert _probe_address("https://huggingface.co") == ("proxy.example", 3128)
    assert _probe_address("https://internal.example") == ("internal.example", 443)
