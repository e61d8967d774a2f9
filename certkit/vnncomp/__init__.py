"""VNN-COMP's harness: instances and ground truth, one instance in a worker process under a
hard deadline (run-instance), whole benchmarks and their score, the competition's result
files. The solver itself is :mod:`certkit.complete`."""
