# Ferry in a container: a build stage makes a virtualenv with the locked versions, the
# runtime stage copies it and runs as an unprivileged user with the queue on a volume.
#   docker build -t ferry .
#   docker run -d --name ferry -p 25:2525 -p 587:2587 -v ferry-data:/var/lib/ferry \
#     -e FERRY_SERVER__HOSTNAME=mail.example.com ferry
#   docker exec ferry ferry queue list

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY ferry ./ferry
RUN python -m venv /opt/ferry \
    && /opt/ferry/bin/pip install --no-cache-dir --disable-pip-version-check \
        -c requirements.lock .

FROM python:3.11-slim-bookworm
RUN groupadd --system --gid 10025 ferry \
    && useradd --system --uid 10025 --gid ferry --home-dir /var/lib/ferry \
        --shell /usr/sbin/nologin ferry \
    && mkdir -p /var/lib/ferry /etc/ferry \
    && chown ferry:ferry /var/lib/ferry \
    && chmod 0750 /var/lib/ferry
COPY --from=build /opt/ferry /opt/ferry
COPY contrib/docker/ferry.toml /etc/ferry/ferry.toml
ENV PATH=/opt/ferry/bin:$PATH \
    FERRY_CONFIG=/etc/ferry/ferry.toml \
    PYTHONUNBUFFERED=1
USER 10025:10025
WORKDIR /var/lib/ferry
VOLUME ["/var/lib/ferry"]
EXPOSE 2525 2587
STOPSIGNAL SIGTERM
ENTRYPOINT ["ferry"]
CMD ["serve"]
