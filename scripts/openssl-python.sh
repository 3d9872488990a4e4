#!/usr/bin/env bash
# Writes DIR/python: this project's virtualenv Python run on Debian trixie's glibc and OpenSSL
# 3.5 (what the container image, python:3.11-slim-trixie, links against) on a bookworm machine
# whose own OpenSSL is 3.0. For measuring what the image does, e.g.
#   python -m benchmarks.load_mtls --python DIR/python
# The packages are checked against the archive's signed index before they are unpacked.
set -euo pipefail
dest=${1:?usage: scripts/openssl-python.sh DIR [VENV_PYTHON]}
venv_python=${2:-$PWD/.venv/bin/python}
mirror=http://deb.debian.org/debian
arch=$(dpkg --print-architecture)
triplet=$(gcc -dumpmachine 2>/dev/null || echo x86_64-linux-gnu)
keyring=/usr/share/keyrings/debian-archive-keyring.gpg

mkdir -p "$dest/debs" "$dest/root"
cd "$dest"
curl -fsS -o InRelease "$mirror/dists/trixie/InRelease"
gpgv --keyring "$keyring" InRelease 2>/dev/null || { echo "InRelease: bad signature" >&2; exit 1; }
index="main/binary-$arch/Packages.xz"
curl -fsS -o Packages.xz "$mirror/dists/trixie/$index"
want=$(awk -v f="$index" '/^SHA256:/{s=1; next} /^[A-Z]/{s=0} s&&$3==f{print $1}' InRelease)
echo "$want  Packages.xz" | sha256sum -c --quiet
xz -dc Packages.xz > Packages
for pkg in libc6 libssl3t64 zlib1g libzstd1; do
  read -r file sum < <(awk -v p="Package: $pkg" '$0==p{f=1} f&&/^Filename:/{n=$2} f&&/^SHA256:/{print n, $2; exit}' Packages)
  curl -fsS -o "debs/${file##*/}" "$mirror/$file"
  echo "$sum  debs/${file##*/}" | sha256sum -c --quiet
  dpkg-deb -x "debs/${file##*/}" root
done

lib=$PWD/root/usr/lib/$triplet
loader=$(ls "$lib"/ld-linux*.so.*)
real=$(readlink -f "$venv_python")
# --argv0 keeps the virtualenv (Python finds pyvenv.cfg beside the name it was started by).
cat > python <<WRAPPER
#!/bin/sh
exec "$loader" --library-path "$lib" --argv0 "$venv_python" "$real" "\$@"
WRAPPER
chmod +x python
./python -c 'import ssl, sys; print(sys.executable, ssl.OPENSSL_VERSION)'
