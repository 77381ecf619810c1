# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""MONAI Label tasks serving the SACB-Net registration bundle."""
