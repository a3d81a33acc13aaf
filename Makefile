# The two entry points of README.md. Both set up everything they need on a fresh machine
# (hack/setup-env.sh: virtualenv + Kubernetes binaries, cached outside the work tree).
.PHONY: up down test lint image

up:
	@VENV=$$(bash hack/setup-env.sh) && "$$VENV/bin/vnpu" up

down:
	@VENV=$$(bash hack/setup-env.sh) && "$$VENV/bin/vnpu" down

test:
	@VENV=$$(bash hack/setup-env.sh) && "$$VENV/bin/ruff" check . && "$$VENV/bin/ruff" format --check . \
	  && "$$VENV/bin/python" -m pytest $(PYTEST_ARGS)

lint:
	@VENV=$$(bash hack/setup-env.sh) && "$$VENV/bin/ruff" check . && "$$VENV/bin/ruff" format --check .

# The vnpu image as an OCI archive (built with mmdebstrap + umoci, cached by content hash under
# ~/.cache/vnpu/image); prints its path. Import: ctr -n k8s.io images import --base-name local.test/vnpu PATH
image:
	@VENV=$$(bash hack/setup-env.sh) && "$$VENV/bin/python" -m vnpu.cluster.imagebuild
