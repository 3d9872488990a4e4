# meshproxy as a sidecar image: runs as UID/GID 1337 so Istio-style iptables rules
# (`-m owner --uid-owner 1337 -j RETURN`) exclude the proxy's own traffic.
FROM python:3.11-slim
WORKDIR /opt/meshproxy
COPY pyproject.toml README.md ./
COPY meshproxy ./meshproxy
RUN pip install --no-cache-dir . \
 && groupadd -g 1337 istio-proxy && useradd -u 1337 -g 1337 -M -s /usr/sbin/nologin istio-proxy
COPY config /etc/meshproxy-examples
USER 1337:1337
EXPOSE 15000 15001 15006 15021
ENTRYPOINT ["meshproxy", "run", "-c", "/etc/meshproxy"]
