"""Integration tests: a real Kafka broker, real DuckDB files, a real uvicorn."""
