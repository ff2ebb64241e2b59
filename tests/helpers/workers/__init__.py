"""Scripts run as one rank of a multi-process test (each also imported by its test for the cases)."""
