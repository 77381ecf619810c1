# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""``python -m bench.accuracy.native_report RESULTS.json``: the Markdown tables of a native-pair results JSON.

The entry point the README documents; the tables are ``bench.accuracy.report.render_native``.
"""

from bench.accuracy.report import main

if __name__ == "__main__":
    main()
