"""Was an open or a click a person, or a machine fetching on their behalf?

Pure functions of what the tracker saw and how long after delivery it came. A fetch is a
``machine`` when it comes from:

- Apple Mail Privacy Protection, which prefetches every image of every message through
  Apple's proxy, with a bare ``Mozilla/5.0`` user agent, from Apple's network (``APPLE_NETWORKS``);
- a security gateway or link scanner (Barracuda, Mimecast, Proofpoint, Symantec, Microsoft
  Safe Links, Cisco IronPort, Forcepoint, Trend Micro...), a crawler, an HTTP library or a
  headless browser, or anything without a user agent (``MACHINE_AGENTS``);
- anywhere, within ``PREFETCH_SECONDS`` of delivery: no person reads that fast, but a gateway
  scanning the message on arrival does.

Gmail's ``GoogleImageProxy`` and Yahoo's mail proxy fetch images only when a person opens the
message, so they count as human. Unsubscribes are POSTs a person asked for: always human.
"""

from __future__ import annotations

import functools
import ipaddress
import re

from mailer.vocabulary import Classification

PREFETCH_SECONDS = 5.0

# Apple's own network: MPP's prefetch proxy fetches from here. The much longer list of
# Private Relay egress ranges (mask-api.icloud.com/egress-ip-ranges.csv) changes often and is
# shared with people browsing; the bare user agent below catches those prefetches instead.
APPLE_NETWORKS = (
    ipaddress.ip_network("17.0.0.0/8"),
    ipaddress.ip_network("2620:149::/32"),
)

# Substrings of user agents that are never a person reading (case-insensitive).
MACHINE_AGENTS = re.compile(
    "|".join(
        (
            r"bot\b",
            r"crawl",
            r"spider",
            r"barracuda",
            r"mimecast",
            r"proofpoint",
            r"symantec",
            r"broadcom",
            r"messagelabs",
            r"safelinks",
            r"microsoft office",
            r"ironport",
            r"cisco",
            r"forcepoint",
            r"websense",
            r"trend ?micro",
            r"headlesschrome",
            r"phantomjs",
            r"^curl/",
            r"^wget/",
            r"python-requests",
            r"python-urllib",
            r"python-httpx",
            r"aiohttp",
            r"go-http-client",
            r"okhttp",
            r"^java/",
            r"libwww-perl",
        )
    ),
    re.IGNORECASE,
)
APPLE_PROXY_AGENT = "Mozilla/5.0"  # the whole user agent of an MPP prefetch


def classify(
    kind: str, user_agent: str | None, ip: str | None, seconds_since_sent: float | None
) -> Classification:
    """``human`` or ``machine`` for one event; ``seconds_since_sent`` is None if unknown."""
    if kind == "unsubscribe":
        return "human"
    if seconds_since_sent is not None and seconds_since_sent < PREFETCH_SECONDS:
        return "machine"
    if machine_agent(user_agent or "") or from_apple(ip):
        return "machine"
    return "human"


@functools.lru_cache(maxsize=4096)  # a few client versions make most of the traffic
def machine_agent(user_agent: str) -> bool:
    agent = user_agent.strip()
    return not agent or agent == APPLE_PROXY_AGENT or MACHINE_AGENTS.search(agent) is not None


@functools.lru_cache(maxsize=65536)  # parsing an address costs more than the rest together
def from_apple(ip: str | None) -> bool:
    if not ip:
        return False
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in network for network in APPLE_NETWORKS)
