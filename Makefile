# The two entry points of README.md. Both set up everything they need on a fresh machine
# (hack/setup-env.sh: virtualenv + Kubernetes binaries, cached outside the work tree).
.PHONY: up down test lint

up:
	@VENV=$$(bash hack/setup-env.sh) && "$$VENV/bin/vnpu" up

down:
	@VENV=$$(bash hack/setup-env.sh) && "$$VENV/bin/vnpu" down

test:
	@VENV=$$(bash hack/setup-env.sh) && "$$VENV/bin/ruff" check . && "$$VENV/bin/ruff" format --check . \
	  && "$$VENV/bin/python" -m pytest $(PYTEST_ARGS)

lint:
	@VENV=$$(bash hack/setup-env.sh) && "$$VENV/bin/ruff" check . && "$$VENV/bin/ruff" format --check .
