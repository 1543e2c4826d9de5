"""The bundled orders service: a reference seckill endpoint (SQL with UNIQUE constraints)."""
