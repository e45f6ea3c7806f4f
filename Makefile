# The two commands of the README's quick start. Each creates .venv on first use.
.PHONY: demo test lint mutate gpu-check clean

demo:
	@bash scripts/setup_venv.sh
	.venv/bin/caopd demo $(DEMO_ARGS)

test:
	@bash scripts/setup_venv.sh dev,cpu-rollout
	.venv/bin/python -m pytest -q tests  # tests/conftest.py sets TRITON_INTERPRET=1 only without CUDA

lint:
	@bash scripts/setup_venv.sh dev,cpu-rollout
	.venv/bin/ruff check --line-length 120 --select E,F,I,W,B,UP --ignore B905 --target-version py310 caopd kernels tests benchmarks scripts setup.py

mutate:  # mutation testing of the pure-Python core (settings in setup.cfg); minutes on 2 cores
	@bash scripts/setup_venv.sh dev,cpu-rollout
	rm -rf mutants
	.venv/bin/mutmut run --max-children 2 || true
	.venv/bin/python scripts/mutation_summary.py

gpu-check:  # on a machine with a CUDA GPU: kernels compiled, bf16 training rules, kernel benchmark
	bash scripts/gpu_check.sh

clean:
	rm -rf .venv runs build *.egg-info mutants
