# make test : install everything, then run the test suite (what CI runs)
# make demo : install everything, then run the main job on the embedded default
PY ?= python3

.PHONY: install test demo bench
install:
	bash scripts/install.sh

test: install
	$(PY) -m pytest -q

demo: install
	dealrec run configs/demo.yaml

bench: install
	$(PY) bench/run_all.py
