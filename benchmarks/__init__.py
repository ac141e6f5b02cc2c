"""Side-by-side benchmarks against TRL. Run all with `make bench` or one with
`python -m benchmarks.<name>`; each prints a table of both sides and the ratio."""
