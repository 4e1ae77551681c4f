# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= demo

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	@if [ "$$(id -u)" = 0 ]; then bash slurm/local-cluster.sh start; fi
	@if [ "$$(id -u)" = 0 ] && ! command -v fpack >/dev/null && command -v apt-get >/dev/null; then \
		echo "installing fpack (libcfitsio-bin) for the .fits.fz tests"; \
		export DEBIAN_FRONTEND=noninteractive; \
		{ apt-get install -y -q --no-install-recommends libcfitsio-bin || { apt-get update -q && \
		  apt-get install -y -q --no-install-recommends libcfitsio-bin; }; } >/dev/null 2>&1 || \
		echo "fpack could not be installed: its tests are skipped"; fi
	$(BIN)/pytest

demo: $(STAMP)
	$(BIN)/cirrus synth $(DEMO)/archive --nights 10 --per-night 60 --cadence-min 3
	$(BIN)/cirrus ingest $(DEMO)/archive $(DEMO)/season.zarr --config jobs/default.toml
	$(BIN)/cirrus prepare $(DEMO)/season.zarr --config jobs/default.toml \
		--evaluate $(DEMO)/archive_truth.zarr --panel $(DEMO)/prepare-panel.png
	$(BIN)/cirrus train $(DEMO)/season.zarr --task both --config jobs/train.toml --epochs 15 \
		--truth $(DEMO)/archive_truth.zarr
	$(BIN)/cirrus reprocess $(DEMO)/season.zarr --config jobs/default.toml
	$(BIN)/cirrus report $(DEMO)/season.zarr --out $(DEMO)/report
	$(BIN)/cirrus info $(DEMO)/season.zarr
	@echo "season report: $(DEMO)/report/report.md (also in MLflow)"
	@echo "MLflow UI: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(DEMO)/mlflow.db --host 127.0.0.1"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_ingest.py
	$(BIN)/python benchmarks/bench_sources.py
	$(BIN)/python benchmarks/bench_prepare.py
	$(BIN)/python benchmarks/bench_train_io.py
	$(BIN)/python benchmarks/bench_reprocess.py
	$(BIN)/python benchmarks/bench_reprocess.py --memory
	$(BIN)/python benchmarks/bench_tune.py

clean:
	rm -rf $(DEMO) bench-out .pytest_cache checkpoints mlflow.db mlruns optuna.db optuna.log
