# Two entry points for a fresh machine: `make demo` and `make test`.
PY      := .venv/bin/python
STAMP   := .venv/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo clean

$(PY):
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip

# Re-installs only when the project metadata changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import genlm_bytes_potential, genlm.control"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf .venv build *.egg-info
