# The two commands of the README:
#   make demo   set up everything, then run the main job (demo corpus -> shards -> post-training -> eval)
#   make test   set up everything, then run the whole test suite
# Set-up = Debian packages (ffmpeg, espeak-ng, klettres-data, libsndfile; chromium + its driver for the page test) + a venv pinned by constraints.txt;
# the tests also start a real two-node SLURM cluster on this machine (slurm-wlm, munge).

PYTHON ?= python3.11
VENV ?= .venv
APT_PACKAGES = ffmpeg espeak-ng klettres-data libsndfile1 chromium chromium-driver
TEST_APT_PACKAGES = slurm-wlm munge
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: setup system-packages test-packages demo test clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

system-packages:
	@if ! (command -v ffmpeg && command -v espeak-ng && [ -d /usr/share/klettres ] && command -v chromium && command -v chromedriver) >/dev/null 2>&1; then \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(APT_PACKAGES); \
	fi

test-packages:
	@if ! (command -v slurmctld && command -v slurmd && command -v munged) >/dev/null 2>&1; then \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(TEST_APT_PACKAGES); \
	fi

setup: system-packages $(VENV)/.installed

demo: setup
	$(VENV)/bin/posttrain demo

test: setup test-packages
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) demo_data runs mlflow.db
