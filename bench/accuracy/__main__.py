"""``python -m bench.accuracy`` = ``python -m bench.accuracy.run``."""

from bench.accuracy.run import main

main()
