"""Benchmarks of jaxvllm, each with its baseline in the same run: `throughput`, `latency`,
`serve` (also as `jaxvllm bench ...`), plus KV utilization and load time."""
