# The two commands of the README: `make run` and `make test`.
.PHONY: run test crd bootstrap

.venv/.installed: requirements.lock pyproject.toml scripts/bootstrap.sh
	scripts/bootstrap.sh

bootstrap: .venv/.installed

# The whole pipeline (validate -> train -> merge -> evaluate) on CPU, with a
# tiny model and an embedded S3 server.
run: .venv/.installed
	.venv/bin/kubetune run examples/finetunejob.yaml --dataset-file examples/data/support.jsonl --tiny-model

# Unit, trainer and cluster tests (the cluster suite builds and starts a real
# control plane; Go must be installed).
test: .venv/.installed
	.venv/bin/python -m pytest $(PYTEST_ARGS)
