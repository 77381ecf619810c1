# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Python components of the SACB-Net registration bundle, importable as ``scripts.<package>`` from the bundle root.

Packages, bottom to top (imports only point down): ``io``, ``layers``, ``networks`` / ``losses``, ``engines``,
``workflow``, then ``cli``. See ``docs/architecture.md``.
"""
