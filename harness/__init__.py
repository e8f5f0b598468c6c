"""The local harness: the services `make run`, the tests and the benches start when none is
given - a Kafka-protocol broker (librdkafka's embedded cluster, or testcontainers), a private
`redis-server` or Redis Cluster. Never imported by the worker, the API or the CLI."""
