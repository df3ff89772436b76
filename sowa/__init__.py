"""The `sowa` command line, the demo and the benchmarks: everything a user runs, on top of model/, training/ and
service/."""
