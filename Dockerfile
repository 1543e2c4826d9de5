# The image runs exactly the wheel that `pip wheel .` builds from this checkout (the
# installed-wheel test, tests/test_installed_wheel.py, builds and runs the same wheel).
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --no-deps --wheel-dir /dist .

FROM python:3.11-slim
COPY --from=wheel /dist /dist
RUN pip install --no-cache-dir /dist/*.whl && rm -rf /dist
EXPOSE 8080 8081
CMD ["seckill-gateway", "serve", "--host", "0.0.0.0", "--port", "8080"]
