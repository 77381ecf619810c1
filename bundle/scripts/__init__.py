# Python components of the SACB-Net registration bundle, importable as ``scripts.<module>`` from the bundle root.
