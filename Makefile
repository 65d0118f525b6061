# shoal — see README.md. Strict shell: a failing step fails the target.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := build

# go-nvml's cgo header marks some NVML calls deprecated; silence that noise.
export CGO_CFLAGS ?= -Wno-deprecated-declarations
GO ?= go
GOBIN := $(shell $(GO) env GOPATH)/bin
PROTOC_GEN_GO_VERSION := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.2
PROTOS := agent replica coordinator


.PHONY: sdk-node
.PHONY: build test test-unit test-integration chaos lint generate check-generated bench demo clean tools fuzz package test-package docs

build:
	$(GO) build -o bin/shoal ./cmd/shoal
	$(GO) build -o bin/shoal-sim ./cmd/shoal-sim

## test: vet, then every test (unit, integration, end-to-end) with the race detector,
## then one round of the fault-injection suite (network namespaces; needs root, ip,
## iptables) on its own, so that its timings do not share the CPUs with the rest, and
## the real-Slurm suite (slurmctld, a slurmd per namespace host, munge) after it. The
## official OpenAI Node SDK (pinned in test/sdk/node) is installed first if missing.
test: sdk-node
	$(GO) vet ./...
	$(GO) test -race -count=1 -timeout 20m $$($(GO) list ./... | grep -v /test/chaos | grep -v /test/slurm)
	$(GO) test -race -count=1 -timeout 20m ./test/chaos/
	$(GO) test -race -count=1 -timeout 20m ./test/slurm/

## chaos: the fault-injection suite, CHAOS_ROUNDS rounds in a random order, report in
## bench/chaos/REPORT.md.
CHAOS_ROUNDS ?= 5
chaos:
	SHOAL_CHAOS_ROUNDS=$(CHAOS_ROUNDS) SHOAL_CHAOS_SEED=$${SHOAL_CHAOS_SEED:-$$(date +%s)} \
	  SHOAL_CHAOS_REPORT=$(CURDIR)/bench/chaos/REPORT.md $(GO) test -count=1 -v -timeout 90m -run TestChaos ./test/chaos/

test-unit:
	$(GO) test -race -count=1 -short ./...

test-integration: sdk-node
	$(GO) test -race -count=1 -timeout 20m ./test/e2e/...

## sdk-node: the Node SDK suite's packages (and playwright-core for the console's browser
## test), exactly as package-lock.json pins them.
sdk-node:
	@[ -d test/sdk/node/node_modules/openai ] && [ -d test/sdk/node/node_modules/playwright-core ] || { command -v npm >/dev/null || { echo "npm missing: apt-get install -y nodejs npm"; exit 1; }; npm ci --prefix test/sdk/node --no-audit --no-fund; }

## lint: gofmt, vet, and the layout rules (import rules, nothing pointing outside the
## repository: internal/layout, docs/architecture.md §8).
lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' | grep -v '\.pb\.go$$')); if [ -n "$$out" ]; then echo "gofmt:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) test -count=1 ./internal/layout/

tools:
	$(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
	$(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)

generate: tools
	@command -v protoc >/dev/null || { echo "protoc missing: apt-get install -y protobuf-compiler"; exit 1; }
	for p in $(PROTOS); do \
	  PATH="$(GOBIN):$$PATH" protoc -I proto --go_out=proto --go_opt=paths=source_relative \
	    --go-grpc_out=proto --go-grpc_opt=paths=source_relative proto/$$p/v1/$$p.proto; \
	done

check-generated: generate
	git diff --exit-code -- proto/ || { echo "generated code is stale: run make generate and commit"; exit 1; }

FUZZTIME ?= 5s
## fuzz: run every fuzz target for FUZZTIME each (CI runs a bounded 5 s per target;
## `make test` always replays the committed seed corpora).
fuzz:
	GO="$(GO)" FUZZTIME=$(FUZZTIME) scripts/fuzz.sh

# Package version: 0.1.0 plus the commit (semver build metadata).
PKG_VERSION ?= 0.1.0+g$(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
NFPM := github.com/goreleaser/nfpm/v2/cmd/nfpm@v2.45.2

## docs: regenerate docs/reference.md from the code.
docs: build
	./bin/shoal gen-docs > docs/reference.md

## package: .deb and .rpm in dist/ (nfpm run as a Go tool; nothing prebuilt is downloaded).
package:
	$(GO) build -ldflags "-X main.version=$(PKG_VERSION)" -o bin/shoal ./cmd/shoal
	$(GO) build -o bin/shoal-sim ./cmd/shoal-sim
	mkdir -p dist
	for p in deb rpm; do SHOAL_VERSION='$(PKG_VERSION)' $(GO) run $(NFPM) package -f deploy/nfpm.yaml -p $$p -t dist/; done

## test-package: install the .deb here with dpkg, check files, user and units, remove it (root).
test-package: package
	bash test/package/test.sh

bench:
	$(GO) test -run '^$$' -bench . -benchmem ./bench/...

## demo: a local cluster (coordinator + 5 agents on 127.0.0.x, simulated H200s) serving OpenAI requests.
## DEMO=wide-ep serves DeepSeek-R1 as DP16×EP groups instead of TP8×PP2; DEMO=pd serves it
## disaggregated (a prefill and a decode role).
demo: build
	./bin/shoal dev $(if $(DEMO),--shape $(DEMO))

clean:
	rm -rf bin
