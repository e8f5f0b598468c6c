# The two set-up commands: `make run` (demo on an embedded broker) and `make test` (the suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Prometheus and promtool from Debian's package, unpacked here (no service is installed or
# started): the alert rules' checks and a real Prometheus scraping a worker in the tests.
TOOLS := .tools
PROMTOOL := $(TOOLS)/usr/bin/promtool
# docker-compose (Debian's, with the Python packages it needs, run by /usr/bin/python3):
# `docker-compose config` validates deploy/compose.yaml without a Docker engine.
COMPOSE := $(TOOLS)/usr/bin/docker-compose
COMPOSE_DEBS := docker-compose python3-docker python3-dockerpty python3-docopt python3-dotenv \
	python3-texttable python3-websocket python3-jsonschema python3-distro python3-requests \
	python3-yaml python3-attr python3-pyrsistent python3-urllib3 python3-certifi python3-chardet \
	python3-idna python3-packaging python3-six python3-charset-normalizer

.PHONY: run test loadtest determinism determinism-stream chaos fuzz bench lint typecheck check demo-data clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(PY) -m loadtest.demo $(if $(EVENTS),--events $(EVENTS))

$(PROMTOOL):
	@mkdir -p $(TOOLS)/deb
	cd $(TOOLS)/deb && apt-get download -q prometheus 2>/dev/null || \
		{ echo "cannot download Debian's prometheus package: tests needing promtool will skip"; exit 0; }
	@for deb in $(TOOLS)/deb/prometheus_*.deb; do test -f "$$deb" && dpkg-deb -x "$$deb" $(TOOLS); done; true

$(COMPOSE):
	@mkdir -p $(TOOLS)/deb-compose
	cd $(TOOLS)/deb-compose && apt-get download -q $(COMPOSE_DEBS) 2>/dev/null || \
		{ echo "cannot download Debian's docker-compose: the compose check will skip"; exit 0; }
	@for deb in $(TOOLS)/deb-compose/*.deb; do test -f "$$deb" && dpkg-deb -x "$$deb" $(TOOLS); done; true

test: $(STAMP) $(PROMTOOL) $(COMPOSE)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

# A generated stream with ground truth through replay and the streaming pipeline, scored.
loadtest: $(STAMP)
	$(PY) -m loadtest.run --events $(or $(EVENTS),20000)

# The arrival-order harness at full size: 200 orders of a 20,000-event generated stream.
determinism: $(STAMP)
	TRACEWATCH_DETERMINISM_EVENTS=$(or $(EVENTS),20000) TRACEWATCH_DETERMINISM_ORDERS=$(or $(ORDERS),200) \
		$(PY) -m pytest -q -s --timeout 0 tests/detectors/test_arrival_order.py -k generated

# Arrival orders of the harness through two workers (each ~1 min): standing alerts = replay's.
determinism-stream: $(STAMP)
	TRACEWATCH_STREAM_ORDERS=$(or $(ORDERS),8) \
		$(PY) -m pytest -q --timeout 0 tests/streams/test_stream_determinism.py

# Faults mid-stream (workers and Redis killed, broker down or slow, injected Kafka errors,
# poison events), each scenario compared with replay: lost / spurious / duplicated, drain time.
chaos: $(STAMP)
	$(PY) -m loadtest.chaos --events $(or $(EVENTS),3000) $(foreach s,$(SCENARIOS),--scenario $(s))

# A million mutated inputs through the parser, the codecs and the replay pipeline.
fuzz: $(STAMP)
	$(PY) -m loadtest.fuzz --inputs $(or $(INPUTS),1000000)

# Throughput, latency, state size and memory, measured together; figures go to loadtest/RESULTS.md.
bench: $(STAMP)
	$(PY) -m loadtest.bench

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache *.egg-info
