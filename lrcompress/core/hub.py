"""Whether the Hugging Face hub can be reached, decided once per process before the first hub request.

Offline, huggingface_hub retries each request with backoff (five retries, about 25 s) before it fails,
so a hub id that cannot be fetched took half a minute and a page of retry warnings to report. One TCP
connection to the hub's endpoint (or to the HTTPS proxy, when one is configured) answers the question in
at most ``PROBE_TIMEOUT`` seconds. When it fails, huggingface_hub, transformers and datasets are switched
to their offline mode (``HF_HUB_OFFLINE=1``): a model or dataset in the local hub cache still loads, and
one that is not fails at once. ``HF_HUB_OFFLINE=1`` set by the user skips the probe.
"""
from __future__ import annotations

import functools
import os
import socket
import sys
import urllib.request
from urllib.parse import urlsplit

PROBE_TIMEOUT = 3.0


def _probe_address(url: str) -> tuple[str, int]:
    """(host, port) a request to ``url`` connects to first: the HTTPS proxy's when one applies."""
    target = urlsplit(url)
    host = target.hostname or ""
    proxy = urllib.request.getproxies().get(target.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        target = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host = target.hostname or ""
    return host, target.port or (443 if target.scheme == "https" else 80)


@functools.cache
def offline_reason() -> str | None:
    """None when the hub accepts a connection; else why not (then offline mode is set for the rest of the
    process). Probed on the first call only."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "offline mode is set (HF_HUB_OFFLINE)"
    try:
        socket.create_connection(_probe_address(constants.ENDPOINT), timeout=PROBE_TIMEOUT).close()
    except OSError as error:
        go_offline()
        return f"the Hugging Face hub ({constants.ENDPOINT}) is not reachable ({error.strerror or error})"
    return None


def hub_reachable() -> bool:
    """Whether hub requests may go out."""
    return offline_reason() is None


def forget_probe() -> None:
    """Probe again on the next call (tests that move the endpoint)."""
    offline_reason.cache_clear()


def go_offline() -> None:
    """Offline mode for huggingface_hub, transformers and datasets (each reads the flag at request
    time from huggingface_hub's constants, datasets from its own config once imported)."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True


def with_offline_reason(message: str) -> str:
    """``message`` (a hub request's failure) with, when the hub could not be asked, why not."""
    reason = offline_reason()
    return message if reason is None else f"{message}; {reason}"
