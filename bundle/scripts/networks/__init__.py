# Copyright (c) the SACB-Net MONAI bundle authors. Licensed under the Apache License, Version 2.0.
"""SACB-Net and its parts: spatial-awareness convolution blocks, k-means, cross-similarity flow head, conv layer."""

from .conv import (
    ChannelsLastConv3d,
)
from .kmeans import (
    kmeans,
    maximin_init,
)
from .cross_similarity import (
    CrossSimilarityFlow,
)
from .sacb import (
    SACB,
    conv_in_lrelu,
)
from .sacb_net import (
    SACBNet,
)
