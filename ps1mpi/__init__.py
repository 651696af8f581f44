"""ps1mpi: the Pan-STARRS-1 Image Processing Pipeline as MPI programs.

Subpackages keep three kinds of code apart:

- ``ps1mpi.algorithms``: pure functions on arrays and tables (no MPI, no files).
- ``ps1mpi.stages``: one module per pipeline stage (inputs, algorithms, products, ledger).
- ``ps1mpi.infra``, ``ps1mpi.geometry``, ``ps1mpi.cli``: ledger, MPI runtime, product I/O,
  configuration, camera and sky geometry, command line.

``ps1mpi.sim`` simulates a survey with truth; ``ps1mpi.bench`` holds the benchmarks.
"""

__version__ = "0.1.0"
