"""Accuracy benchmark of the SACB-Net bundle against identity and ANTs SyN on real labelled brain pairs."""
