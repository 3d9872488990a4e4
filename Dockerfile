# meshproxy as a sidecar image: the hot path compiled with mypyc (setup.py), running as
# UID/GID 1337 so Istio-style iptables rules (`-m owner --uid-owner 1337`) exempt the proxy.
# Debian trixie on both stages, named rather than implied: its OpenSSL (3.5) costs markedly less
# per TLS record and per handshake than bookworm's 3.0 (benchmarks.load_mtls --python measures
# both), and the compiled wheel must be built against the glibc it runs on.
FROM python:3.11-trixie AS build
WORKDIR /src
COPY pyproject.toml setup.py hot-modules.txt README.md ./
COPY buildsupport ./buildsupport
COPY meshproxy ./meshproxy
COPY config ./config
# The default build compiles the hot path; MESHPROXY_MYPYC=1 makes a failure to compile fatal.
# The example configs are copied with symlinks resolved (config/demo points into the package).
RUN MESHPROXY_MYPYC=1 pip wheel --no-cache-dir --no-deps -w /wheels . \
 && cp -rL config /examples

FROM python:3.11-slim-trixie
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
 && groupadd -g 1337 istio-proxy && useradd -u 1337 -g 1337 -M -s /usr/sbin/nologin istio-proxy
COPY --from=build /examples /etc/meshproxy-examples
USER 1337:1337
# 15001/15006: capture listeners, 15021: readiness. The admin port (15000) binds 127.0.0.1 only.
EXPOSE 15001 15006 15021
ENTRYPOINT ["meshproxy", "run", "-c", "/etc/meshproxy"]
