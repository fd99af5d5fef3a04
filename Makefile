# Two commands set up a fresh machine: `make demo` and `make test`.
# Both create .venv (pinned: requirements.txt + constraints.txt), build the
# ROS 2 interfaces in msg/ into it, and install the `x2p` command line.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.x2p-installed
export ROS_AUTOMATIC_DISCOVERY_RANGE ?= LOCALHOST

.PHONY: venv demo test bench bench-adapt bench-ablation colcon clean

venv: $(STAMP)

$(STAMP): requirements.txt constraints.txt setup.py package.xml CMakeLists.txt msg/*.msg tools/build_interfaces.sh
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "installing pinned dependencies into $(VENV) (log: $(VENV)/pip.log)"
	@$(PY) -m pip install --disable-pip-version-check -r requirements.txt -c constraints.txt \
		>$(VENV)/pip.log 2>&1 || { grep -v '^WARNING: Location' $(VENV)/pip.log | tail -n 30; exit 1; }
	@$(PY) -m pip install --disable-pip-version-check --no-deps --no-build-isolation \
		--config-settings editable_mode=compat -e . >>$(VENV)/pip.log 2>&1 \
		|| { tail -n 30 $(VENV)/pip.log; exit 1; }
	@tools/build_interfaces.sh $(VENV)
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m x2p_ros.demo --out demo_output

test: $(STAMP)
	$(PY) -m pytest -q test

bench: $(STAMP)
	$(PY) -m x2p_ros.bench --out docs/BENCHMARKS.md

# x2p adapt on each real CT (30 minutes each on a CPU); make bench reports docs/adapt_result.json
bench-adapt: $(STAMP)
	$(PY) -m x2p_ros.adapt_bench --minutes $(or $(MINUTES),30) --json docs/adapt_result.json

# The paper's Table 3 by one recipe: X2P-Net, its ablations and the lifting baseline trained on DATA (a data set
# of `x2p data synth`) and measured alike; on a GPU at the paper's sizes. make bench reports docs/ablation_result.json
bench-ablation: $(STAMP)
	@test -n "$(DATA)" || { echo "make bench-ablation DATA=folder [SIZES=paper|cpu] [EPOCHS=60]"; exit 2; }
	$(PY) -m x2p_ros.ablation_bench --data $(DATA) --sizes $(or $(SIZES),paper) --epochs $(or $(EPOCHS),60) \
		--json docs/ablation_result.json

# The ROS user's build path, exercised with colcon from the same venv.
colcon: $(STAMP)
	tools/colcon_build.sh $(VENV) build/colcon

clean:
	rm -rf build demo_output
