# Weir — `make run` starts the whole suite, `make test` runs every test against real engines.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
SITE = $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
GEN := gen/python
TOOLS := $(CURDIR)/.tools/bin
GRPCURL_VERSION := v1.9.3
BUF_VERSION := v1.50.0
PROTOC_GEN_GO_VERSION := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.2
# Weir's own protos; the Google ones vendored under protos/google come with googleapis-common-protos.
PROTOS := $(shell find protos/weir -name '*.proto')
GATEWAY := 127.0.0.1:$(or $(WEIR_GATEWAY_PORT),50051)

.PHONY: help venv lock proto api-baseline tools credentials worker-user engines schema topics bootstrap run stop status test bench lint clean

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

venv: $(VENV)/.installed ## Python venv with the pinned packages; repo and generated code on its path.
$(VENV)/.installed: requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) is required (Weir targets Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.lock
	# Make expands a recipe before running it, so the venv's site dir is asked for in the shell.
	printf '%s\n%s\n' "$(CURDIR)" "$(CURDIR)/$(GEN)" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/weir-dev.pth"
	# The `weir` console script (pyproject.toml); setuptools is already there for grpcio-tools.
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

lock: ## Re-pin requirements.lock from requirements.in (in a scratch venv).
	rm -rf .cache/lockvenv && $(PYTHON) -m venv .cache/lockvenv
	.cache/lockvenv/bin/pip install -q -r requirements.in
	{ echo '# Pinned by `make lock` from requirements.in; install with pip install -r requirements.lock.'; \
	  .cache/lockvenv/bin/pip freeze; } > requirements.lock

proto: $(GEN)/.stamp ## Generate Python code from protos/ into gen/python.
$(GEN)/.stamp: $(VENV)/.installed $(PROTOS)
	rm -rf $(GEN) && mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -I protos -I "$(SITE)" --python_out=$(GEN) --pyi_out=$(GEN) \
	  --grpc_python_out=$(GEN) $(PROTOS)
	touch $@

tools: $(TOOLS)/grpcurl $(TOOLS)/buf $(TOOLS)/jaeger $(TOOLS)/protoc-gen-go $(TOOLS)/protoc-gen-go-grpc ## Pinned grpcurl, buf, Jaeger and the Go code generators, built from the Go module proxy.
$(TOOLS)/grpcurl:
	GOBIN=$(TOOLS) go install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION)
$(TOOLS)/buf:
	GOBIN=$(TOOLS) go install github.com/bufbuild/buf/cmd/buf@$(BUF_VERSION)
$(TOOLS)/protoc-gen-go:
	GOBIN=$(TOOLS) go install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
$(TOOLS)/protoc-gen-go-grpc:
	GOBIN=$(TOOLS) go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)
# Jaeger's module has replace directives, which `go install pkg@version` refuses: its version
# is pinned as a tool of a module of ours instead (deploy/local/jaeger/go.mod).
$(TOOLS)/jaeger: deploy/local/jaeger/go.mod deploy/local/jaeger/go.sum
	cd deploy/local/jaeger && GOBIN=$(TOOLS) go install tool

credentials: venv ## The deployment CA and each service's TLS certificate (once), in .weir/credentials.
	$(PY) -m libs.tls init

worker-user: ## The unprivileged user workers run as when the suite runs as root.
	deploy/local/worker-user.sh

engines: venv tools ## Fetch (Maven) and start Kafka, Cassandra and Jaeger on 127.0.0.1.
	deploy/local/engines.sh start all

schema: venv ## Apply the Cassandra schema migrations.
	$(PY) -m libs.cassandra.migrate

topics: venv ## Create the Kafka topics.
	$(PY) -m libs.kafka.topics

bootstrap: venv proto tools credentials worker-user engines schema topics

run: bootstrap ## Start the whole suite and a demo tenant.
	deploy/local/services.sh start
	$(PY) -m services.gateway.admin ensure-tenant demo --key-file .weir/demo-api-key --demo-functions
	@echo
	@echo "Weir is up. Gateway: $(GATEWAY)   demo API key: .weir/demo-api-key"
	@echo "  $(TOOLS)/grpcurl -plaintext $(GATEWAY) list"
	@echo "Traces: http://127.0.0.1:$(or $(WEIR_JAEGER_UI_PORT),16686)/api (Jaeger; docs/observability.md)"
	@echo "Prometheus metrics: each service's 'metrics on' address above (docs/metrics.md)"
	@echo "Logs: .var/log/   Stop everything: make stop"

stop: ## Stop the services, then Kafka, Cassandra and Jaeger.
	-deploy/local/services.sh stop
	deploy/local/engines.sh stop all

status: ## Show what is running.
	@deploy/local/services.sh status; deploy/local/engines.sh status

lint: venv proto tools ## ruff, mypy, buf lint and buf breaking.
	$(VENV)/bin/ruff check libs services tests benchmarks deploy
	$(VENV)/bin/mypy  # configured in pyproject.toml; reads gen/python, hence proto
	$(TOOLS)/buf lint
	$(TOOLS)/buf breaking --against protos/api-baseline.binpb.gz

api-baseline: tools ## Record the protos as published: later changes must stay wire and JSON compatible.
	$(TOOLS)/buf build -o protos/api-baseline.binpb.gz

test: venv proto tools worker-user node-client ## Run every test against real Kafka and Cassandra (stops what it started).
	$(MAKE) --no-print-directory lint
	deploy/local/with-engines.sh $(PY) -m pytest $(PYTEST_ARGS)

bench: run ## Benchmarks (not tests): figures into bench-results/, see docs/benchmarks.md.
	$(PY) -m benchmarks.engines
	$(PY) -m benchmarks.pipeline
	$(PY) -m benchmarks.semantics
	$(PY) -m benchmarks.flow
	$(PY) -m benchmarks.tracing

clean: ## Remove generated code and local state (stops everything first).
	-$(MAKE) --no-print-directory stop
	rm -rf $(GEN) .var .weir $(NODE_CLIENT)/node_modules

# --- Clients in other languages (docs/clients.md) ------------------------------------------
# The Go client's generated code (clients/go/weir/v1) is committed, and
# tests/interop/test_go_client.py regenerates it to check it is current: the plugins are tools
# (protoc-gen-go's version is the google.golang.org/protobuf of clients/go/go.mod). Its
# dependencies are pinned by clients/go/go.sum; `go test` fetches them from the module proxy.
.PHONY: go-client node-client
go-client: tools ## Regenerate the Go client's code (clients/go/weir/v1) from protos/weir/v1.
	rm -rf clients/go/weir/v1
	$(TOOLS)/buf generate --template clients/go/buf.gen.yaml

NODE_CLIENT := clients/node
node-client: $(NODE_CLIENT)/node_modules/.installed ## The Node.js client's npm packages, as locked.
$(NODE_CLIENT)/node_modules/.installed: $(NODE_CLIENT)/package.json $(NODE_CLIENT)/package-lock.json
	@command -v npm >/dev/null || { echo "Node.js 20 or later with npm is required (clients/node)"; exit 1; }
	cd $(NODE_CLIENT) && npm ci --prefer-offline --no-audit --no-fund
	touch $@
