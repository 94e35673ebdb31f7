# One image for primaryd, secondaryd and the host containers' client tools.
#
# Build it with `make images` (scripts/build-images.sh): that fills
# docker/wheels with the project and its Python dependencies as wheels built
# on the build machine (no package index is needed inside the build), and
# picks BASE_IMAGE: the official slim Python image when it is present
# locally, else a Debian 12 base made with debootstrap + docker import (no
# container registry needed). Either base works: docker/install-system-packages.sh
# installs from the Debian archive only what the base lacks.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

COPY docker/install-system-packages.sh /usr/local/lib/splitmirror/
RUN sh /usr/local/lib/splitmirror/install-system-packages.sh

# Dependencies first (their wheels rarely change: this layer stays cached),
# the project itself last.
COPY docker/wheels/deps/ /tmp/wheels/deps/
RUN python3 -m venv /opt/splitmirror \
 && /opt/splitmirror/bin/pip install -q --no-index --no-deps /tmp/wheels/deps/*.whl \
 && rm -rf /tmp/wheels
COPY docker/wheels/app/ /tmp/wheels/app/
RUN /opt/splitmirror/bin/pip install -q --no-index --no-deps /tmp/wheels/app/*.whl \
 && /opt/splitmirror/bin/pip check \
 && rm -rf /tmp/wheels

ENV PATH=/opt/splitmirror/bin:$PATH
COPY docker/healthcheck.py /usr/local/bin/splitmirror-healthcheck
COPY docker/fs-tool.py /usr/local/bin/splitmirror-fs
COPY docker/tls-init.sh /usr/local/bin/splitmirror-tls-init
RUN chmod 0755 /usr/local/bin/splitmirror-healthcheck /usr/local/bin/splitmirror-fs /usr/local/bin/splitmirror-tls-init \
 && splitmirror --help >/dev/null && primaryd --help >/dev/null && secondaryd --help >/dev/null

WORKDIR /root
# primaryd/secondaryd take their flags from docker-compose.yml; host
# containers run `sleep infinity` and are driven with `docker exec`;
# splitmirror-tls-init makes the deployment's certificates (service tls-init).
CMD ["splitmirror", "--help"]
