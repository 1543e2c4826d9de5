FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY lua ./lua
RUN pip install --no-cache-dir .
EXPOSE 8080 8081
CMD ["seckill-gateway", "serve", "--host", "0.0.0.0", "--port", "8080"]
