# Production image for the portal (web, worker, beat). Host agents run on the hosts themselves.
FROM rust:1-bookworm AS native
WORKDIR /src/imaging/native
COPY imaging/native/ ./
RUN cargo build --release --locked

FROM node:20-bookworm-slim AS js
WORKDIR /src
COPY frontend/package.json frontend/package-lock.json frontend/
COPY scripts/vendor-js.sh scripts/
RUN bash scripts/vendor-js.sh

FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 BULKHEAD_PROFILE=production BULKHEAD_DATA_DIR=/data
RUN apt-get update && apt-get install -y --no-install-recommends libvirt-dev pkg-config gcc erofs-utils e2fsprogs \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml requirements.lock.txt ./
# Versions from the lock only, with hashes (the same lock make run and make test install).
RUN pip install --no-cache-dir --require-hashes --no-deps -r requirements.lock.txt
COPY portal/ portal/
COPY tenants/ tenants/
COPY imaging/ imaging/
COPY compute/ compute/
COPY frontend/ frontend/
COPY manage.py ./
COPY --from=native /src/imaging/native/target/release/lib_native.so imaging/_native.abi3.so
COPY --from=js /src/frontend/static/vendor/ frontend/static/vendor/
RUN pip install --no-cache-dir --no-deps --no-build-isolation . && mkdir -p /data
EXPOSE 8000
# Compose runs `python manage.py deploy` once first (migrate, collectstatic, first operator).
CMD ["python", "-m", "daphne", "-b", "0.0.0.0", "-p", "8000", "portal.asgi:application"]
