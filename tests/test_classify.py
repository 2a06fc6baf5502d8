"""Human or machine: proxies, scanners and prefetches are machines; people's clients are not."""

from __future__ import annotations

import pytest

from mailer.tracking.classify import PREFETCH_SECONDS, classify

CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/126.0.0.0 Safari/537.36"
)
IPHONE_MAIL = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15"
GMAIL_PROXY = (
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)"
)
YAHOO_PROXY = "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html"
A_MINUTE = 60.0


@pytest.mark.parametrize(
    "agent",
    [
        CHROME,
        IPHONE_MAIL,
        GMAIL_PROXY,
        YAHOO_PROXY,
        "Mozilla/4.0 (compatible; ms-office; MSOffice 16)",  # Outlook on Windows
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)",
    ],
)
def test_people_s_clients_and_open_time_proxies_are_human(agent: str) -> None:
    assert classify("open", agent, "203.0.113.9", A_MINUTE) == "human"
    assert classify("click", agent, "203.0.113.9", A_MINUTE) == "human"


@pytest.mark.parametrize(
    "agent",
    [
        "Mozilla/5.0",  # Apple Mail Privacy Protection's prefetch
        " Mozilla/5.0 ",
        "",
        "Barracuda Sentinel (EE)",
        "Mozilla/5.0 (compatible; Mimecast URL Protect)",
        "Proofpoint URL Defense",
        "Symantec Email Security.cloud",
        "Mozilla/5.0 (Windows NT 10.0) Microsoft Office/16.0 (Microsoft Outlook 16.0.5)",
        "SafeLinks Detonation",
        "Cisco IronPort",
        "Forcepoint Web Security",
        "Trend Micro InterScan",
        "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
        "Mozilla/5.0 (compatible; bingbot/2.0)",
        "Baiduspider",
        "curl/8.5.0",
        "python-requests/2.32.3",
        "Go-http-client/1.1",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 HeadlessChrome/126.0.0.0",
    ],
)
def test_scanners_proxies_and_tools_are_machines(agent: str) -> None:
    assert classify("open", agent, "203.0.113.9", A_MINUTE) == "machine"
    assert classify("click", agent, "203.0.113.9", A_MINUTE) == "machine"


@pytest.mark.parametrize("ip", ["17.58.100.1", "17.0.0.1", "2620:149:a:1::5"])
def test_apple_network_is_a_machine_whatever_the_agent(ip: str) -> None:
    assert classify("open", IPHONE_MAIL, ip, A_MINUTE) == "machine"


def test_a_fetch_within_seconds_of_delivery_is_a_machine() -> None:
    assert classify("open", CHROME, "203.0.113.9", 0.5) == "machine"
    assert classify("click", CHROME, "203.0.113.9", PREFETCH_SECONDS - 0.01) == "machine"
    assert classify("open", CHROME, "203.0.113.9", PREFETCH_SECONDS) == "human"


def test_unknown_delivery_time_and_odd_addresses_fall_back_to_the_agent() -> None:
    assert classify("open", CHROME, None, None) == "human"
    assert classify("open", CHROME, "not-an-ip", None) == "human"
    assert classify("open", "Mozilla/5.0", None, None) == "machine"


def test_an_unsubscribe_is_a_person_s_request() -> None:
    assert classify("unsubscribe", "", "17.1.2.3", 0.0) == "human"
