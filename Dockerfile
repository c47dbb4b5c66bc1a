# sniproxy as a container image, installed from an offline bundle: no compiler and no package
# index at build time, so the same file builds on amd64 and on arm64 (the bundle holds both
# architectures' wheels). docs/container.md says how to run it on ECS and EKS.
#
#   sniproxy bundle --python 3.11 --platform x86_64,aarch64 -o sniproxy-bundle.tar.gz
#   docker build -t sniproxy .
#
# BASE must be a Debian 12 with CPython 3.11 as python3.11 (the bundle's Python), a POSIX sh,
# sha256sum and useradd: the official python:3.11-slim-bookworm is one; so is debian:12 with
# Debian's python3 and python3-venv.
ARG BASE=docker.io/library/python:3.11-slim-bookworm

FROM ${BASE} AS install
ARG BUNDLE=sniproxy-bundle.tar.gz
# ADD unpacks a local tarball: sniproxy-bundle/ with the wheels and install.sh.
ADD ${BUNDLE} /tmp/
# install.sh checks every file against SHA256SUMS, then installs with pip --no-index
# --require-hashes into a venv. pip and setuptools are not needed to run sniproxy.
RUN /tmp/sniproxy-bundle/install.sh /opt/sniproxy \
 && /opt/sniproxy/bin/python -m pip uninstall --quiet --yes pip setuptools

# The venv links to the base's python3.11, so it is copied onto the same base.
FROM ${BASE}
COPY --from=install /opt/sniproxy /opt/sniproxy
# A fixed numeric user, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin sniproxy
USER 10001:10001
ENV PATH=/opt/sniproxy/bin:$PATH PYTHONUNBUFFERED=1
# 8443, not 443: a non-root user may bind it anywhere. The balancer (or -p 443:8443) serves
# 443. /metrics, /healthz and /readyz: 9464 ([metrics] port).
EXPOSE 8443 9464
# SIGTERM starts the drain: /readyz turns 503, listeners stay open for [server] drain_delay,
# then connections get drain_timeout. Give `docker stop -t` / stopTimeout /
# terminationGracePeriodSeconds more than the two together.
STOPSIGNAL SIGTERM
# Docker's own health check (ECS and Kubernetes use their own: docs/container.md). The base's
# python, as slim images have no curl; any answer but 200 fails it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/readyz', timeout=2)"]
# `run` reads /etc/sniproxy/sniproxy.toml (mount it), or give flags:
#   docker run IMAGE run --region eu-west-1 --account 123456789012 --port 8443
ENTRYPOINT ["sniproxy"]
CMD ["run"]
