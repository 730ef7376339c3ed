# kubetune: the operator and the trainer stages in one image.
#   docker build -t ghcr.io/kubetune/kubetune:0.1.0 .
FROM python:3.11-slim AS build

ENV UV_COMPILE_BYTECODE=1 UV_LINK_MODE=copy
RUN pip install --no-cache-dir uv
WORKDIR /src
# Dependencies first, from the lock only: the layer is reused until the lock changes.
COPY requirements.lock pyproject.toml ./
RUN uv venv /opt/kubetune && uv pip install --python /opt/kubetune/bin/python --no-cache -r requirements.lock
COPY . .
RUN uv pip install --python /opt/kubetune/bin/python --no-cache --no-deps .

FROM python:3.11-slim
# The restricted Pod Security profile needs a numeric non-root user; the
# operator's pod templates run as 1000:1000.
RUN groupadd --gid 1000 kubetune && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin kubetune
COPY --from=build /opt/kubetune /opt/kubetune
ENV PATH=/opt/kubetune/bin:$PATH PYTHONUNBUFFERED=1 HOME=/tmp
USER 1000:1000
ENTRYPOINT ["kubetune"]
CMD ["operator"]
