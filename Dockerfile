# warmpool-router container image.
#
#   docker build -t warmpool-router:0.1.0 .
#   docker run --rm -p 8080:8080 warmpool-router:0.1.0 --demo 3
#
# Two stages: the builder makes a wheel of the project and installs it with its
# dependencies into /opt/venv; the final image holds only that venv on the same Python
# base, with no pip cache, compiler or source tree. Pin both FROM lines by digest in your
# own build (python:3.11-slim@sha256:...) for reproducible images.

FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
RUN python -m venv /opt/venv

# Only what the build needs (pyproject names README.md as the long description).
COPY pyproject.toml README.md ./
COPY router ./router

# Every dependency ships manylinux wheels for CPython 3.11 (uvloop, httptools, aiohttp,
# ...), so nothing is compiled here. pip and setuptools leave the venv afterwards: the
# router needs neither at run time.
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install /wheels/*.whl \
 && /opt/venv/bin/pip uninstall --yes pip setuptools


FROM python:3.11-slim

# Numeric user, so the kubelet can verify runAsNonRoot without reading /etc/passwd.
RUN groupadd --system --gid 10001 router \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin router

# Same base image as the builder: the venv's python symlink resolves to the same
# /usr/local/bin/python3.11.
COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER 10001:10001
EXPOSE 8080 9090
ENTRYPOINT ["warmpool-router"]
