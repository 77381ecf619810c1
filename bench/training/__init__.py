# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""Training-data preparation for the shipped weights (real scans from shared/data)."""
