# Two commands on a fresh machine: `make bench` (quick sweep + dashboard) and `make test`.
# Both create .venv (seeing the system's packages, so a preinstalled CUDA torch is reused),
# install torch for this machine (tools/install_torch.py) and this project with its extras.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rampde-installed

.PHONY: bench test clean

$(STAMP): pyproject.toml tools/install_torch.py
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python tools/install_torch.py
	$(BIN)/python -m pip install --quiet -e ".[bench,test]"
	touch $(STAMP)

bench: $(STAMP)
	$(BIN)/rampde-bench run --suite quick
	$(BIN)/rampde-bench report

test: $(STAMP)
	$(BIN)/python -m pytest --benchmark-disable

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
