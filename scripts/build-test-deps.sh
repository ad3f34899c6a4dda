#!/usr/bin/env bash
# The heavy things the test suite runs besides kleidi, each built once per machine and then reused from
# ~/.cache/kleidi (or Go's module cache): called by `scripts/setup.sh test`, so that no test's 300 s
# timeout has to cover a first build. A second run with nothing changed takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
kube_version=${KUBE_VERSION:-v1.36.3}
# kube-apiserver for the end-to-end suite; kubelet, scheduler and controller-manager for the node tests.
scripts/build-kube.sh "$kube_version" kube-apiserver kubelet kube-scheduler kube-controller-manager >/dev/null
# helm for the chart's lint/template tests, and prometheus-operator's published CRDs for their dry runs.
scripts/build-go-tool.sh helm helm.sh/helm/v3@v3.22.0 helm.sh/helm/v3/cmd/helm >/dev/null
(cd /tmp && go mod download github.com/prometheus-operator/prometheus-operator@v0.85.0)
# cosign for the signing tests.
scripts/sign-artifacts.sh cosign >/dev/null
# kleidi's own image (wheel, OCI archive, SBOM) for the image, kubelet and supply-chain tests.
scripts/build-image.sh >/dev/null
