# Every target sets up what it needs: `make demo` and `make test` work on a fresh clone.
# Tools run from .venv/bin; nothing needs activating.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help venv demo test test-fast lint bench email-clients screenshots clean

help:
	@echo "make demo   set up, then render the sample post's variants under var/"
	@echo "make test   set up, lint, then run the tests (SQLite and PostgreSQL)"
	@echo "make test-fast  the in-process tests alone, no lint (-m 'not subprocess and not outage')"
	@echo "make lint   ruff check, ruff format --check, mypy"
	@echo "make bench  run the benchmarks"
	@echo "make email-clients  what of our HTML some mail clients lack (caniemail), beyond MJML's"
	@echo "make screenshots    the sample posts at 600 and 375 px, under docs/screenshots/"
	@echo "make venv   create .venv and install mailer with its dev tools"
	@echo "make clean  remove .venv, caches and var/ (the default SQLite database too)"

venv: $(STAMP)

# Reinstalls only when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

DEMO_POST := examples/posts/the-quiet-harbour.md
DEMO_SLUG := the-quiet-harbour

# The demo signs its links with the built-in development key, which only MAILER_ENV=dev allows.
demo: export MAILER_ENV ?= dev
demo: venv
	$(BIN)/mailer db upgrade
	$(BIN)/mailer posts add $(DEMO_POST)
	@for variant in free paid; do for format in html eml; do \
		$(BIN)/mailer preview $(DEMO_SLUG) --variant $$variant --format $$format \
			--out var/preview/$(DEMO_SLUG).$$variant.$$format || exit 1; \
	done; done
	$(BIN)/python examples/make_sample_list.py var/sample-readers.csv
	$(BIN)/mailer subscribers import var/sample-readers.csv
	$(BIN)/mailer segments save paying 'tier:paid,comped'
	@for expr in all tier:free tier:trial tier:paid tier:comped 'tier:free AND tag:politics' @paying; do \
		n=$$($(BIN)/mailer segments count "$$expr") || exit 1; printf '  %-28s %s\n' "$$expr" "$$n"; \
	done
	$(BIN)/python examples/demo_send.py
	$(BIN)/python examples/demo_track.py

# Debian's docker-compose checks docker-compose.yml in the tests; Postfix bounces a send back
# to `mailer bounces serve` (test_postfix.py runs a private instance; the system's stays off);
# SpamAssassin scores the sample posts' messages and Chromium lays them out; BIND's
# named-checkzone loads the DNS records `mailer dkim check` prints.
TEST_TOOLS := /usr/bin/docker-compose /usr/sbin/postfix /usr/bin/spamassassin /usr/bin/chromium \
	/usr/bin/named-checkzone

# The outage scenarios (-m outage) spend most of their time waiting out the faults they inject,
# so they run beside the rest of the suite; their report is printed after the suite's. The suite
# spreads over two processes (-n 2) and the scenarios, which mostly wait, over three (-n 3):
# about 3 minutes in all on 2 cores (4 minutes with both at -n 2).
OUTAGE_LOG := var/test-outages.log

test: venv lint $(TEST_TOOLS)
	@mkdir -p var
	@$(BIN)/pytest -m outage -n 3 -p no:cacheprovider >$(OUTAGE_LOG) 2>&1 & outages=$$!; \
	trap 'kill $$outages 2>/dev/null' INT TERM; \
	$(BIN)/pytest -m "not outage" -n 2; rest=$$?; \
	wait $$outages; status=$$?; \
	echo "== the outage scenarios, run beside the suite:"; cat $(OUTAGE_LOG); \
	exit $$(( rest || status ))

# The loop while working: the tests that start no process, in under a minute. They still use
# PostgreSQL and Redis; `pytest -m "not subprocess and not outage and not postgres and not redis"`
# needs neither.
test-fast: venv
	$(BIN)/pytest -m "not subprocess and not outage" -n 2

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The benchmarks' reference servers and load generators, from Debian's packages.
BENCH_TOOLS := /usr/sbin/smtp-sink /usr/bin/wrk /usr/sbin/nginx

bench: venv $(BENCH_TOOLS)
	$(BIN)/python -m bench.run

APT_INSTALL := apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	apt-get install -y -qq --no-install-recommends

$(BENCH_TOOLS):
	$(APT_INSTALL) postfix wrk nginx-light

/usr/bin/docker-compose:
	$(APT_INSTALL) docker-compose

# Debian's package may start the system's Postfix (port 25) where services run: the tests
# never use it.
/usr/sbin/postfix:
	$(APT_INSTALL) postfix

/usr/bin/spamassassin:
	$(APT_INSTALL) spamassassin

/usr/bin/chromium:
	$(APT_INSTALL) chromium

/usr/bin/named-checkzone:
	$(APT_INSTALL) bind9-utils

# doiuse-email (npm) in a folder of its own, pinned; the report never fetches anything itself.
DOIUSE := .tools/node_modules/@jsx-email/doiuse-email/package.json

email-clients: venv $(DOIUSE)
	$(BIN)/python -m bench.email_clients

$(DOIUSE): /usr/bin/npm
	npm install --prefix .tools --no-save --no-audit --no-fund @jsx-email/doiuse-email@1.0.4

/usr/bin/npm:
	$(APT_INSTALL) nodejs npm

screenshots: venv /usr/bin/chromium
	$(BIN)/python -m bench.screenshots

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis var .tools
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
