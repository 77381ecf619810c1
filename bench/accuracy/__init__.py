"""Accuracy benchmark of the SACB-Net bundle against identity and ANTs on real labelled brain pairs.

Organised by concept: ``pairs`` (what is registered), ``methods`` (how, each as its own process), ``scoring`` (the
bundle's metrics on the fixed grid), ``runner`` (runs the tasks, measures them, keeps the results JSON), ``report``
(Markdown tables). Every method is scored with the bundle's own metrics (``scripts.workflow.metrics``), so the bundle's
root is put on ``sys.path`` here, the one place, as MONAI bundles expect (``scripts.*`` importable).
"""

import sys
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[2] / "bundle"
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))
