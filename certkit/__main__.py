"""``python -m certkit``: the command line, as the ``certkit`` script runs it (and as
``torchrun --nproc-per-node N -m certkit train …`` starts each process)."""

from certkit.cli import main

if __name__ == "__main__":
    main(prog_name="certkit")
