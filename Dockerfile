# meshproxy as a sidecar image: the hot path compiled with mypyc (setup.py), running as
# UID/GID 1337 so Istio-style iptables rules (`-m owner --uid-owner 1337`) exempt the proxy.
# One image, two roles, as Istio's proxyv2: the sidecar (`run`, the default command) and the
# init container that installs the capture rules (`iptables --apply`, run as root with
# NET_ADMIN and NET_RAW; `meshproxy inject` writes both).
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
# iptables (nft and legacy) and iproute2 for the init container's `meshproxy iptables --apply`.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
 && groupadd -g 1337 istio-proxy && useradd -u 1337 -g 1337 -M -s /usr/sbin/nologin istio-proxy
COPY --from=build /examples /etc/meshproxy-examples
USER 1337:1337
# 15001/15006: capture listeners, 15021: readiness (and POST /quitquitquit from the pod),
# 15090: Prometheus. The admin port (15000) binds 127.0.0.1 only and is not exposed.
EXPOSE 15001 15006 15021 15090
# The mesh YAML is read from /etc/meshproxy: mount the ConfigMap there (config/kubernetes/).
ENTRYPOINT ["meshproxy"]
CMD ["run", "-c", "/etc/meshproxy"]
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s \
  CMD ["meshproxy", "wait", "--timeoutSeconds", "3", "--periodMillis", "500"]
