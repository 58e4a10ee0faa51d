#!/usr/bin/env bash
# Installs what `--features mpi` needs on Debian/Ubuntu: Open MPI (headers, mpicc for rsmpi's
# build script, mpirun for the tests) and libclang for bindgen. Does nothing when they are
# already present, so it is cheap to call from .ci/run on every build.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

# bindgen loads libclang at build time; no binary to probe for, so look for the unversioned
# libclang.so that libclang-dev installs (the runtime package alone lacks clang's headers).
have_libclang() {
  compgen -G '/usr/lib/llvm-*/lib/libclang.so' >/dev/null || compgen -G '/usr/lib/*/libclang.so' >/dev/null
}

if have mpicc && have mpirun && have_libclang; then
  echo "mpi-setup: mpicc, mpirun and libclang present"
  exit 0
fi

if ! have apt-get; then
  echo "mpi-setup: mpicc/mpirun/libclang missing and no apt-get; install Open MPI (dev) and libclang by hand" >&2
  exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q libopenmpi-dev openmpi-bin libclang-dev
mpirun --version | head -n 1
