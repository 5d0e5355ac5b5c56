"""The benchmark harness (`make bench`): the router against nginx and a direct path, kept
apart from the test suite because its numbers, not pass/fail, are the point."""
